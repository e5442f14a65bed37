# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython monotonic alignment search: one item per OpenMP thread, without the GIL.

Semantics (band limits, the -1e9 sentinel, float32 sums, ties stay) are described in
``vits_fast/monotonic_align/_numpy.py``; this file and the NumPy fallback are bit-identical. Unlike
upstream, the scores are read only: the search keeps one DP row and records one decision byte per cell.
"""

from cython.parallel import prange
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import numpy as np

cdef float NEG = -1e9


cdef int _search_item(int[:, ::1] path, const float[:, ::1] value, int t_y, int t_x) noexcept nogil:
    """Zero ``path`` and write the best path of one item into it; returns 1 when out of memory."""
    cdef Py_ssize_t t_y_max = value.shape[0]
    cdef Py_ssize_t t_x_max = value.shape[1]
    cdef Py_ssize_t y, x, lo, hi
    cdef float left, up, best
    cdef float *prev
    cdef float *cur
    cdef float *tmp
    cdef float *buf
    cdef unsigned char *step
    cdef int index

    if t_x_max > 0:
        for y in range(t_y_max):
            memset(&path[y, 0], 0, t_x_max * sizeof(int))
    if t_x < 1 or t_x > t_y or t_x > t_x_max or t_y > t_y_max:
        return 0  # undefined lengths: the path stays all zero

    buf = <float *> malloc(2 * t_x * sizeof(float))
    step = <unsigned char *> malloc(<size_t> t_y * t_x)
    if buf == NULL or step == NULL:
        free(buf)
        free(step)
        return 1
    prev = buf
    cur = buf + t_x
    memset(step, 0, <size_t> t_y * t_x)

    for y in range(t_y):
        lo = t_x + y - t_y
        if lo < 0:
            lo = 0
        hi = y + 1
        if hi > t_x:
            hi = t_x
        for x in range(lo, hi):
            if x == 0:
                left = 0.0 if y == 0 else NEG
            else:
                left = prev[x - 1]
            up = NEG if x == y else prev[x]
            best = up if up > left else left
            cur[x] = value[y, x] + best
            if x != 0 and (x == y or up < left):
                step[y * t_x + x] = 1
        tmp = prev
        prev = cur
        cur = tmp

    index = t_x - 1
    for y in range(t_y - 1, -1, -1):
        path[y, index] = 1
        index = index - step[y * t_x + index]

    free(step)
    free(buf)
    return 0


def maximum_path_c(int[:, :, ::1] paths, const float[:, :, ::1] values, const int[::1] t_ys, const int[::1] t_xs):
    """Fill ``paths`` (int32 ``[b, t_y_max, t_x_max]``, written completely) with the best monotonic path of
    each item of ``values`` (float32 ``[b, t_y_max, t_x_max]``, read only); ``t_ys``/``t_xs`` are int32 ``[b]``.
    Items in parallel over OpenMP threads without the GIL."""
    cdef Py_ssize_t b = values.shape[0]
    cdef Py_ssize_t i
    cdef int failed = 0
    if paths.shape[0] != b or paths.shape[1] != values.shape[1] or paths.shape[2] != values.shape[2]:
        raise ValueError("paths and values must have the same shape")
    if t_ys.shape[0] != b or t_xs.shape[0] != b:
        raise ValueError("t_ys and t_xs must have one entry per batch item")
    for i in prange(b, nogil=True, schedule="dynamic"):
        failed += _search_item(paths[i], values[i], t_ys[i], t_xs[i])
    if failed:
        raise MemoryError("monotonic_align: out of memory for the decision buffer")
