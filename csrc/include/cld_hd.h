// CLD_HD: host + device inline functions in the plain C++ headers shared by csrc/cpu and csrc/cuda.
#pragma once

#include <stdint.h>

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#ifndef CLD_HD
#if defined(__CUDACC__)
#define CLD_HD __host__ __device__ __forceinline__
#else
#define CLD_HD inline
#endif
#endif
