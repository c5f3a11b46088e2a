// What model/cpu/sgemm.cc's driver and its per-instruction-set micro-kernels share. Private to
// model/cpu/.
#pragma once

namespace loopmoe::model::ops::cpu {

// What every micro-kernel call of one K block shares.
struct MicroArgs {
  int kc = 0;           // K values in this block
  bool resume = false;  // continue the chain parked in `part` (false: start from zero)
  bool final = true;    // last K block: write alpha·acc (+ beta·C) into C; else park it in `part`
  int ldp = 0;          // row stride of `part`
  int panel = 0;        // floats from one k to the next in the B panel: the table's nv · width
                        // when packed, ldb when a row-major B is read in place
  float alpha = 1.f, beta = 0.f;
  int ldc = 0;
};

// One tile: rows × (nv·width) of C from an A strip and a B panel (x.panel apart per k). A is read
// row-major (element (r, k) at ap[r·a_stride + k]) or k-major (ap[k·a_stride + r]); the last `cols`
// <= nv·width columns are written.
using MicroKernel = void (*)(const MicroArgs& x, const float* ap, int a_stride, const float* bp,
                             float* c, float* part, int cols);

constexpr int kMaxMr = 12, kMaxNv = 8;

// kernel[rows - 1][vectors - 1][row_major_a] for rows <= mr, vectors <= nv.
struct MicroTable {
  int mr = 0, nv = 0, width = 0;
  MicroKernel kernel[kMaxMr][kMaxNv][2] = {};
};

// One table per instruction set; each is built in a file compiled for that set.
const MicroTable& avx512_micro_table();
const MicroTable& avx2_micro_table();
const MicroTable& portable_micro_table();

}  // namespace loopmoe::model::ops::cpu
