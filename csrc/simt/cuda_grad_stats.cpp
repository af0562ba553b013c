// csrc/cuda/grad_stats.cu compiled as host C++ against the SIMT emulation (tests/simt.py builds it).
#include "../cuda/grad_stats.cu"
