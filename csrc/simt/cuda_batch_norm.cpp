// csrc/cuda/batch_norm.cu compiled as host C++ against the SIMT emulation (tests/simt.py builds it).
#include "../cuda/batch_norm.cu"
