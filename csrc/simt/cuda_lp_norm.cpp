// csrc/cuda/lp_norm.cu compiled as host C++ against the SIMT emulation (tests/simt.py builds it).
#include "../cuda/lp_norm.cu"
