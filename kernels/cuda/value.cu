// The critic's value from a CDF row (kernels/src/critic.rs, `value_from_cdf`), fused:
//   w_m = max(F_m - F_{m-1}, 0) + eps (F_0 = 0),  Z = sum_m w_m,
//   V = log sum_m w_m exp(lc_m) - log Z,  lc_m = lambda c_m,
// with the log-sum-exp taken around its maximum (lambda c_m in the hundreds does not overflow; a
// bin with w_m = 0 gives a_m = -inf and drops out). The CPU reference is `value_lse_cpu` in
// kernels/src/cuda/value.rs.
//
// One warp per row, lanes stride over the M bins, shuffle trees for max and sums: a fixed order,
// bitwise reproducible. The sums are in double (see row_sums). The backward recomputes Z and the
// log-sum-exp of its row (M is small).

#include <math_constants.h>

#define WARP 32

__device__ __forceinline__ double warp_sum(double x) {
    for (int off = WARP / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

__device__ __forceinline__ double warp_max(double x) {
    for (int off = WARP / 2; off > 0; off /= 2) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

__device__ __forceinline__ float bin_diff(const float *row, int m) {
    return m == 0 ? row[0] : row[m] - row[m - 1];
}

// The row's Z and log sum_m w_m exp(lc_m), every lane gets both. In double, as the CPU reference
// sums: with |lambda c| ~ 100 the log-sum-exp is ~100, where one float ulp (7.6e-6) is already
// the size of the tolerance once it multiplies gradients of ~1e6; M <= a few hundred bins, so
// double costs nothing that matters.
__device__ __forceinline__ void row_sums(const float *row, const float *lc, int bins, float eps,
                                         int lane, double *z_out, double *lse_out) {
    double amax = -CUDART_INF, z = 0.0;
    for (int m = lane; m < bins; m += WARP) {
        const double w = (double)(fmaxf(bin_diff(row, m), 0.0f) + eps);
        z += w;
        amax = fmax(amax, log(w) + (double)lc[m]);
    }
    z = warp_sum(z);
    amax = warp_max(amax);
    double s = 0.0;
    for (int m = lane; m < bins; m += WARP) {
        const double w = (double)(fmaxf(bin_diff(row, m), 0.0f) + eps);
        s += exp(log(w) + (double)lc[m] - amax);
    }
    s = warp_sum(s);
    *z_out = z;
    *lse_out = log(s) + amax;
}

extern "C" __global__ void value_fwd(
    const float *__restrict__ f,   // [rows, bins], the CDF at the grid points
    const float *__restrict__ lc,  // [bins], lambda * c_m
    float *__restrict__ out,       // [rows]
    int rows, int bins, float eps)
{
    const int warps_per_block = blockDim.x / WARP;
    const int i = blockIdx.x * warps_per_block + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (i >= rows) return;  // uniform across a warp
    double z, lse;
    row_sums(f + (long long)i * bins, lc, bins, eps, lane, &z, &lse);
    if (lane == 0) out[i] = (float)(lse - log(z));
}

// dV/dw_m = exp(lc_m - lse) - 1 / Z; through w_m = relu(d_m) + eps with relu'(d) = [d >= 0]
// (candle's convention) and d_m = F_m - F_{m-1}:
//   grad_F_m = g (q_m - q_{m+1}),  q_m = dV/dw_m [d_m >= 0],  q_{M+1} = 0.
extern "C" __global__ void value_bwd(
    const float *__restrict__ f,   // [rows, bins]
    const float *__restrict__ lc,  // [bins]
    const float *__restrict__ g,   // [rows], the incoming gradient of V
    float *__restrict__ grad_f,    // [rows, bins]
    int rows, int bins, float eps)
{
    const int warps_per_block = blockDim.x / WARP;
    const int i = blockIdx.x * warps_per_block + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (i >= rows) return;
    const float *row = f + (long long)i * bins;
    double z, lse;
    row_sums(row, lc, bins, eps, lane, &z, &lse);
    const double inv_z = 1.0 / z, gi = g[i];
    for (int m = lane; m < bins; m += WARP) {
        const double qm = bin_diff(row, m) >= 0.0f ? exp((double)lc[m] - lse) - inv_z : 0.0;
        const double qn = (m + 1 < bins && bin_diff(row, m + 1) >= 0.0f)
                              ? exp((double)lc[m + 1] - lse) - inv_z
                              : 0.0;
        grad_f[(long long)i * bins + m] = (float)(gi * (qm - qn));
    }
}
