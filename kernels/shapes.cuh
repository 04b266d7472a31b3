// Launch shapes that kernel code depends on, defined once for both sides: the kernels use these
// names, and kernels/cuda.py launches with them, reading this file (each `constexpr int NAME = N;`
// line, so a plain number on each).
#pragma once

constexpr int ATTENTION_HEAD_SIZE = 64;  // every GPT-2 size has C / NH = 64
constexpr int ATTENTION_TILE = 64;       // query (or key) rows per block
constexpr int ATTENTION_THREADS = 128;   // 4 warps x 16 rows: one tile
constexpr int ENCODER_WTE_LANES = 16;    // encoder_backward_wte: block (32, 16), 16 row lanes
constexpr int DBIAS_ROWS_PER_SLAB = 64;  // matmul_dbias_partials: rows of dout per block
constexpr int DBIAS_WARPS = 8;           // both bias-gradient kernels: block (32, 8)
constexpr int DBIAS_STRIP = 256;         // matmul_dbias_partials: columns per block, 32 lanes x 8
