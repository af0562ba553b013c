#pragma once
// Stand-in for the CUDA bfloat16 header under the SIMT emulation (csrc/simt/half.h).
#include "../half.h"
