// Shared macros for the torch-free core. Nothing here may include torch or CUDA headers,
// so that the same arithmetic compiles with g++ (CPU ops, GoogleTest) and nvcc (kernels).
#pragma once

#if defined(__CUDACC__)
#define MOE_EP_HD __host__ __device__
#else
#define MOE_EP_HD
#endif
