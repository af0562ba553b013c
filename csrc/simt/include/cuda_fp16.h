#pragma once
// Stand-in for the CUDA half-precision header under the SIMT emulation (csrc/simt/half.h).
#include "../half.h"
