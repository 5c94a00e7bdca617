// Segment path log-ratio of a residual policy against its reference (kernels/src/logprob.rs,
// `path_log_ratio_residual_rows`), fused: for L steps of b rows,
//   out[i] = sum_j sum_d ( z[r, d] u[r, d] - u[r, d]^2 / 2 ),  u = scale[r] * v[r, d],  r = j b + i,
// where v is the residual's output and scale[r] = c_eps / sigma of the row's step, so that
// u = dmu / sigma. The CPU reference is `segment_log_ratio_cpu` in kernels/src/cuda/log_ratio.rs.
//
// Forward: one warp per output row i, lanes stride over its L * d elements, then a shuffle tree.
// The order of every sum is fixed by the launch shape, so results are bitwise reproducible (no
// atomics). Backward: one thread per element.

#define WARP 32

extern "C" __global__ void log_ratio_fwd(
    const float *__restrict__ v,      // [L * b, d]
    const float *__restrict__ z,      // [L * b, d]
    const float *__restrict__ scale,  // [L * b]
    float *__restrict__ out,          // [b]
    int b, int len, int d)
{
    const int warps_per_block = blockDim.x / WARP;
    const int i = blockIdx.x * warps_per_block + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (i >= b) return;  // whole warps exit together: i is uniform across a warp
    const long long n = (long long)len * d;
    float acc = 0.0f;
    for (long long t = lane; t < n; t += WARP) {
        const int j = (int)(t / d);
        const long long r = (long long)j * b + i;
        const long long e = r * d + (t - (long long)j * d);
        const float u = scale[r] * v[e];
        acc += z[e] * u - 0.5f * u * u;
    }
    for (int off = WARP / 2; off > 0; off /= 2)
        acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[i] = acc;
}

// grad_v[r, d] = g[r mod b] * scale[r] * (z[r, d] - scale[r] * v[r, d]).
extern "C" __global__ void log_ratio_bwd(
    const float *__restrict__ v,      // [L * b, d]
    const float *__restrict__ z,      // [L * b, d]
    const float *__restrict__ scale,  // [L * b]
    const float *__restrict__ g,      // [b], the incoming gradient of out
    float *__restrict__ grad_v,       // [L * b, d]
    int b, int len, int d)
{
    const long long n = (long long)len * b * d;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / d;
        const float s = scale[r];
        grad_v[e] = g[r % b] * s * (z[e] - s * v[e]);
    }
}
