// csrc/cuda/sync.cu compiled as host C++ against the SIMT emulation (tests/simt.py builds it).
#include "../cuda/sync.cu"
