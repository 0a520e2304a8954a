/* Direct convolution kernels (see conv_direct.h and conv_direct_kernels.h).
 *
 * Each micro-kernel is compiled three times, for AVX-512, for AVX2+FMA and for the baseline
 * target, with GCC's target attribute, and chosen at run time from what the CPU supports: the
 * build never assumes -march=native. On other architectures only the portable one exists.
 */
#include <string.h>

#include "conv_direct.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define FR_X86 1
#else
#define FR_X86 0
#endif

/* ---- micro-kernels: (float, double) x (avx512, avx2, portable) ---- */
#if FR_X86
#define TARGET __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define VB 64
#define FWD_RV 4
#define WG_RF 4
#define WT_NV 2
#define WT_NT 12
#define T float
#define TI int
#define SUF f32_avx512
#include "conv_direct_kernels.h"
#undef T
#undef TI
#undef SUF
#define T double
#define TI long long
#define SUF f64_avx512
#include "conv_direct_kernels.h"
#undef T
#undef TI
#undef SUF
#undef TARGET
#undef VB
#undef FWD_RV
#undef WG_RF
#undef WT_NV
#undef WT_NT

#define TARGET __attribute__((target("avx2,fma")))
#define VB 32
#define FWD_RV 2
#define WG_RF 2
#define WT_NV 2
#define WT_NT 6
#define T float
#define TI int
#define SUF f32_avx2
#include "conv_direct_kernels.h"
#undef T
#undef TI
#undef SUF
#define T double
#define TI long long
#define SUF f64_avx2
#include "conv_direct_kernels.h"
#undef T
#undef TI
#undef SUF
#undef TARGET
#undef VB
#undef FWD_RV
#undef WG_RF
#undef WT_NV
#undef WT_NT
#endif

#define TARGET
#define VB 16
#define FWD_RV 2
#define WG_RF 2
#define WT_NV 2
#define WT_NT 6
#define T float
#define TI int
#define SUF f32_portable
#include "conv_direct_kernels.h"
#undef T
#undef TI
#undef SUF
#define T double
#define TI long long
#define SUF f64_portable
#include "conv_direct_kernels.h"
#undef T
#undef TI
#undef SUF
#undef TARGET
#undef VB
#undef FWD_RV
#undef WG_RF
#undef WT_NV
#undef WT_NT

/* ---- instruction-set selection ---- */
int fr_isa_supported(int isa)
{
    if (isa == FR_ISA_PORTABLE)
        return 1;
#if FR_X86
    __builtin_cpu_init();
    if (isa == FR_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == FR_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

int fr_isa_best(void)
{
    if (fr_isa_supported(FR_ISA_AVX512))
        return FR_ISA_AVX512;
    if (fr_isa_supported(FR_ISA_AVX2))
        return FR_ISA_AVX2;
    return FR_ISA_PORTABLE;
}

int fr_wgrad_rf(int isa)
{
    return isa == FR_ISA_AVX512 ? 4 : 2;
}

int fr_wgradt_nt(int isa)
{
    return isa == FR_ISA_AVX512 ? 12 : 6;
}

int fr_wgradt_nf(int isa, int dsize)
{
    /* filters per block: WT_NV vectors */
    const int vb = isa == FR_ISA_AVX512 ? 64 : isa == FR_ISA_AVX2 ? 32 : 16;
    return 2 * vb / dsize;
}

idx_t fr_dy_size(const fr_geom* g)
{
    return g->wgt ? g->G * g->OH * g->Wq * g->Fg_r : g->F * g->Pf_r;
}

/* Taps per pass of the forward kernel over an item's positions (0: all in one pass); see
 * kfwd in conv_direct_driver.h. Set by conv2d.pyx when it loads (FORWARD_TAPS; tests and
 * benchmarks may change it). */
idx_t fr_fwd_taps = 0;

idx_t fr_set_fwd_taps(idx_t n)
{
    const idx_t previous = fr_fwd_taps;
    fr_fwd_taps = n;
    return previous;
}

/* ---- per-item drivers ---- */
/* The Winograd transforms' 64-byte vector helpers are always inlined, so no call passes a
 * vector in registers: GCC's note that such calls differ between the target clones (reported
 * at the end of the file, where the clones are emitted) does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"
#define T float
#define TS f32
#include "conv_direct_driver.h"
#undef T
#undef TS
#define T double
#define TS f64
#include "conv_direct_driver.h"
#undef T
#undef TS
