// csrc/cuda/noisy_batch_norm.cu compiled as host C++ against the SIMT emulation (tests/simt.py builds it).
#include "../cuda/noisy_batch_norm.cu"
