// csrc/running_stats.cpp (any device) in the emulation's extension, so bnext_simt has every op.
#include "../running_stats.cpp"
