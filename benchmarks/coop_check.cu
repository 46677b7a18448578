// The first-minute check of benchmarks/gpu_run.sh: the persistent kernels (CUDA's
// gru_*_persistent, Triton's PERSIST split kernels) wait at a grid barrier, which only
// returns if every block is resident at once.  Both launch cooperatively, and rely on the
// driver to REFUSE a cooperative grid larger than fits (cudaErrorCooperativeLaunchTooLarge)
// instead of running it and hanging.  This checks that on the machine, with a kernel that
// cannot hang if the driver does run it (no barrier), then runs a grid that fits through a
// real grid.sync().
//
//   nvcc -O2 -arch=sm_90 -o coop_check benchmarks/coop_check.cu && timeout 30 ./coop_check
//
// Exit status: 0 refused + the fitting grid synchronised; 1 otherwise; the last line says.
#include <cooperative_groups.h>
#include <cstdio>

namespace cg = cooperative_groups;

__global__ void no_barrier(int* out) {
  if (threadIdx.x == 0) atomicAdd(out, 1);
}

__global__ void with_barrier(int* out) {
  cg::grid_group grid = cg::this_grid();
  if (threadIdx.x == 0) atomicAdd(out, 1);
  grid.sync();
  // after the barrier every block's arrival is visible
  if (blockIdx.x == 0 && threadIdx.x == 0) out[1] = *(volatile int*)out;
}

int main() {
  int dev = 0, sms = 0, coop = 0, occ = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  const int threads = 1024;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, no_barrier, threads, 0);
  printf("coop_check: %d SMs, cooperative launch %s, %d block(s) of %d threads per SM\n", sms,
         coop ? "supported" : "NOT supported", occ, threads);
  int* buf = nullptr;
  if (cudaMalloc(&buf, 2 * sizeof(int)) != cudaSuccess) { printf("FAIL: cudaMalloc\n"); return 1; }
  cudaMemset(buf, 0, 2 * sizeof(int));

  const int too_many = occ * sms + 1;
  void* args[] = {&buf};
  cudaError_t e = cudaLaunchCooperativeKernel((void*)no_barrier, dim3(too_many), dim3(threads),
                                              args, 0, 0);
  cudaError_t sync = cudaDeviceSynchronize();
  cudaGetLastError();  // a refused launch is not sticky: clear it
  printf("coop_check: %d blocks (1 more than fit): %s / sync %s\n", too_many,
         cudaGetErrorString(e), cudaGetErrorString(sync));
  const bool refused = e != cudaSuccess;

  int fit = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, with_barrier, threads, 0);
  cudaMemset(buf, 0, 2 * sizeof(int));
  e = cudaLaunchCooperativeKernel((void*)with_barrier, dim3(occ * sms), dim3(threads), args, 0, 0);
  sync = cudaDeviceSynchronize();
  int host[2] = {0, 0};
  cudaMemcpy(host, buf, sizeof(host), cudaMemcpyDeviceToHost);
  fit = (e == cudaSuccess && sync == cudaSuccess && host[1] == occ * sms);
  printf("coop_check: %d blocks through grid.sync(): %s / sync %s, block 0 saw %d arrivals\n",
         occ * sms, cudaGetErrorString(e), cudaGetErrorString(sync), host[1]);
  printf("coop_check: %s\n", refused && fit ? "OK (oversized cooperative grid refused, fitting grid synchronised)"
                                            : (!refused ? "FAIL: the driver RAN an oversized cooperative grid"
                                                        : "FAIL: the fitting cooperative grid did not synchronise"));
  return refused && fit ? 0 : 1;
}
