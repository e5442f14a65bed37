"""VITS/Piper training losses, always evaluated in float32 (an fp32 island under autocast).

Same values as upstream's ``losses.py``; unlike upstream nothing here reads a number back to the host
(``discriminator_loss`` returns per-discriminator losses as tensors, not Python floats), so a CUDA step has no
hidden synchronisation.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def feature_loss(fmap_r: Sequence[Sequence[torch.Tensor]], fmap_g: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Feature matching: 2 * sum over discriminators and layers of mean |real - generated| (real detached).

    fmap_r/fmap_g: per discriminator, a list of feature maps of equal shapes.
    """
    with torch.autocast(_device_type(fmap_g), enabled=False):
        loss = torch.zeros((), device=fmap_g[0][0].device)
        for dr, dg in zip(fmap_r, fmap_g):
            for rl, gl in zip(dr, dg):
                loss = loss + torch.mean(torch.abs(rl.detach().float() - gl.float()))
        return loss * 2


def discriminator_loss(disc_real_outputs: Sequence[torch.Tensor], disc_generated_outputs: Sequence[torch.Tensor]
                       ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """LSGAN discriminator loss: sum of mean (1 - D(real))^2 + mean D(fake)^2.

    Returns (total, per-discriminator real losses, per-discriminator fake losses), all 0-d tensors.
    """
    with torch.autocast(_device_type([disc_real_outputs]), enabled=False):
        loss = torch.zeros((), device=disc_real_outputs[0].device)
        r_losses: List[torch.Tensor] = []
        g_losses: List[torch.Tensor] = []
        for dr, dg in zip(disc_real_outputs, disc_generated_outputs):
            r_loss = torch.mean((1 - dr.float()) ** 2)
            g_loss = torch.mean(dg.float() ** 2)
            loss = loss + r_loss + g_loss
            r_losses.append(r_loss.detach())
            g_losses.append(g_loss.detach())
        return loss, r_losses, g_losses


def generator_loss(disc_outputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """LSGAN generator loss: sum of mean (1 - D(fake))^2; returns (total, per-discriminator losses)."""
    with torch.autocast(_device_type([disc_outputs]), enabled=False):
        loss = torch.zeros((), device=disc_outputs[0].device)
        gen_losses: List[torch.Tensor] = []
        for dg in disc_outputs:
            l_dg = torch.mean((1 - dg.float()) ** 2)
            gen_losses.append(l_dg)
            loss = loss + l_dg
        return loss, gen_losses


def kl_loss(z_p: torch.Tensor, logs_q: torch.Tensor, m_p: torch.Tensor, logs_p: torch.Tensor,
            z_mask: torch.Tensor) -> torch.Tensor:
    """KL term of VITS, averaged over valid frames.

    z_p, logs_q: [b, h, t_y] (flowed posterior sample and posterior log-std); m_p, logs_p: [b, h, t_y] (prior
    expanded to frames); z_mask: [b, 1, t_y].
    """
    with torch.autocast(z_p.device.type, enabled=False):
        z_p, logs_q, m_p, logs_p, z_mask = (t.float() for t in (z_p, logs_q, m_p, logs_p, z_mask))
        kl = logs_p - logs_q - 0.5
        kl = kl + 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2.0 * logs_p)
        return torch.sum(kl * z_mask) / torch.sum(z_mask)


def _device_type(nested: Sequence[Sequence[torch.Tensor]]) -> str:
    return nested[0][0].device.type
