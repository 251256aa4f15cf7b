/* The integer part of zoplan's z on the CPU, and the float arithmetic fused with its use.
 *
 * zoplan.runtime.perturb_cpu compiles this file (plain C, no torch headers) at first use and calls
 * it through ctypes on tensors' data pointers. The algorithm is perturb.py's module docstring;
 * its constants arrive as -D definitions taken from perturb.py, so they have one source.
 *
 * z = sqrt(-2 * log(u1)) * cos(angle) is computed in three passes over a chunk of elements small
 * enough to stay in the cache:
 *   1. zo_words: u1 and angle from the words a, b (steps 2-5 of the algorithm up to log and cos);
 *   2. torch's own kernels, in place on the two chunk buffers: radius = sqrt(-2 * log(u1)) and
 *      cos(angle) (torch's log, sqrt and cos round differently from the C library's: their bits
 *      must be torch's);
 *   3. zo_finish: z = radius * cos(angle), then the use of z (store it, or form base + alpha * z,
 *      or MeZO's update) for every element of the chunk.
 * Every float operation here is one IEEE float32 multiply, add or subtract rounded to nearest, in
 * the order torch's separate kernels apply them (the file must be compiled with -ffp-contract=off:
 * no multiply-add may be fused, and without -ffast-math), so the results are the torch path's bits.
 *
 * A table describes where the elements go: one row of 8 int64 per range of one parameter
 * (see perturb_cpu.py): the range's first element in the concatenation of all ranges (vstart),
 * its position in the buffer, its count, the low and high words of its first index, the name's
 * constant splitmix64(crc32(name)), and its weight-decay flag. A range never crosses a multiple of
 * 2**32, so its round keys are constant. Chunks are counted in the concatenation of the ranges.
 */
#include <math.h> /* fabsf */
#include <stdint.h>
#include <string.h>

#if !defined(ZO_H32_C1) || !defined(ZO_H32_C2) || !defined(ZO_GOLDEN) || !defined(ZO_HI_MUL) || \
    !defined(ZO_ANGLE_SCALE) || !defined(ZO_TWO_POW_M24)
#error "compile with the constants of zoplan.runtime.perturb (-DZO_H32_C1=... see perturb_cpu.py)"
#endif

enum { ROW = 8, R_VSTART = 0, R_POS = 1, R_COUNT = 2, R_LO = 3, R_HI = 4, R_MIX = 5, R_DECAY = 6 };
enum { MODE_NORMAL = 0, MODE_AXPY = 1, MODE_PERTURBED = 2, MODE_UPDATE = 3 };
enum { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3 };
enum { TILE = 512 };

static inline uint64_t splitmix64(uint64_t x) {
    uint64_t z = x + (uint64_t)ZO_GOLDEN;
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static inline uint32_t h32(uint32_t x) {
    x ^= x >> 16;
    x *= (uint32_t)ZO_H32_C1;
    x ^= x >> 15;
    x *= (uint32_t)ZO_H32_C2;
    return x ^ (x >> 15);
}

/* Steps 2-3: the round keys of a row at step seed `seed`. */
static inline void round_keys(const int64_t *row, uint64_t seed, uint32_t k[3]) {
    uint64_t key = splitmix64(seed ^ (uint64_t)row[R_MIX]);
    uint64_t base = key ^ ((uint64_t)row[R_HI] * (uint64_t)ZO_HI_MUL);
    uint64_t w1 = splitmix64(base), w2 = splitmix64(base + (uint64_t)ZO_GOLDEN);
    k[0] = (uint32_t)w1;
    k[1] = (uint32_t)(w1 >> 32);
    k[2] = (uint32_t)w2;
}

/* The last row whose vstart is <= v (rows are sorted by vstart, none is empty). */
static int64_t find_row(const int64_t *rows, int64_t nrows, int64_t v) {
    int64_t lo = 0, hi = nrows - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (rows[mid * ROW + R_VSTART] <= v)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* Walks the rows over elements v0 .. v0 + n - 1 of the concatenation, piece by piece: each piece
 * lies in one row (`row`), starts `off` elements into it, holds `m` elements, and starts `k`
 * elements into the chunk. */
typedef struct {
    const int64_t *rows, *row;
    int64_t next, v0, n, off, m, k;
} pieces;

static pieces first_piece(const int64_t *rows, int64_t nrows, int64_t v0, int64_t n) {
    pieces p = {rows, 0, find_row(rows, nrows, v0), v0, n, 0, 0, 0};
    return p;
}

static int next_piece(pieces *p) {
    p->k += p->m;
    if (p->k >= p->n)
        return 0;
    p->row = p->rows + p->next++ * ROW;
    p->off = p->v0 + p->k - p->row[R_VSTART];
    p->m = p->row[R_COUNT] - p->off < p->n - p->k ? p->row[R_COUNT] - p->off : p->n - p->k;
    return 1;
}

/* Pass 1: u1[k] = ((a >> 8) + 1) * 2**-24 (exact) and ang[k] = float(b >> 8) * ANGLE_SCALE (one
 * rounding) for the chunk's elements. Both integers are below 2**24 + 1, so the conversions to
 * float are exact (through int32, which every vector unit converts). */
void zo_words(const int64_t *rows, int64_t nrows, uint64_t seed, int64_t v0, int64_t n, float *restrict u1,
              float *restrict ang) {
    for (pieces p = first_piece(rows, nrows, v0, n); next_piece(&p);) {
        uint32_t key[3];
        round_keys(p.row, seed, key);
        const uint32_t k0 = key[0], k1 = key[1], k2 = key[2];
        const uint32_t lo = (uint32_t)p.row[R_LO] + (uint32_t)p.off;
        float *restrict u = u1 + p.k, *restrict g = ang + p.k;
        for (int64_t j = 0; j < p.m; j++) {
            uint32_t a = h32(h32((lo + (uint32_t)j) ^ k0) ^ k1);
            uint32_t b = h32(a ^ k2);
            u[j] = (float)(int32_t)((a >> 8) + 1) * (float)ZO_TWO_POW_M24;
            g[j] = (float)(int32_t)(b >> 8) * (float)ZO_ANGLE_SCALE;
        }
    }
}

/* The words a, b themselves, at the rows' buffer positions (a check of the key derivation). */
void zo_words_int(const int64_t *rows, int64_t nrows, uint64_t seed, int64_t n, uint32_t *restrict a_out,
                  uint32_t *restrict b_out) {
    for (pieces p = first_piece(rows, nrows, 0, n); next_piece(&p);) {
        uint32_t key[3];
        round_keys(p.row, seed, key);
        const uint32_t lo = (uint32_t)p.row[R_LO] + (uint32_t)p.off;
        uint32_t *restrict pa = a_out + p.row[R_POS] + p.off, *restrict pb = b_out + p.row[R_POS] + p.off;
        for (int64_t j = 0; j < p.m; j++) {
            uint32_t a = h32(h32((lo + (uint32_t)j) ^ key[0]) ^ key[1]);
            pa[j] = a;
            pb[j] = h32(a ^ key[2]);
        }
    }
}

/* ----- float32 <-> storage dtypes, rounding like torch's conversions ----------------------------- */
static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* bfloat16: round to nearest even (c10::BFloat16's conversion) */
static inline uint16_t bf16_of(float f) {
    uint32_t u = bits_of(f);
    if (f != f)
        return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* IEEE half <-> float (c10::Half's fp16_ieee_from_fp32_value / fp16_ieee_to_fp32_value) */
static inline uint16_t f16_of(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_of(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float f32_of_f16(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

static void load_tile(float *restrict dst, const void *src, int dt, int64_t at, int64_t m) {
    switch (dt) {
    case DT_F32:
        memcpy(dst, (const float *)src + at, (size_t)m * 4);
        break;
    case DT_F64: {
        const double *s = (const double *)src + at;
        for (int64_t j = 0; j < m; j++)
            dst[j] = (float)s[j];
        break;
    }
    case DT_BF16: {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int64_t j = 0; j < m; j++)
            dst[j] = float_of((uint32_t)s[j] << 16);
        break;
    }
    default: {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int64_t j = 0; j < m; j++)
            dst[j] = f32_of_f16(s[j]);
    }
    }
}

static void store_tile(void *dst, int dt, int64_t at, const float *restrict src, int64_t m) {
    switch (dt) {
    case DT_F32:
        memcpy((float *)dst + at, src, (size_t)m * 4);
        break;
    case DT_F64: {
        double *d = (double *)dst + at;
        for (int64_t j = 0; j < m; j++)
            d[j] = (double)src[j];
        break;
    }
    case DT_BF16: {
        uint16_t *d = (uint16_t *)dst + at;
        for (int64_t j = 0; j < m; j++)
            d[j] = bf16_of(src[j]);
        break;
    }
    default: {
        uint16_t *d = (uint16_t *)dst + at;
        for (int64_t j = 0; j < m; j++)
            d[j] = f16_of(src[j]);
    }
    }
}

/* Pass 3, after torch's pass: z = radius * cos, then its use, for the chunk's elements, tile by tile.
 *   MODE_NORMAL     x := z
 *   MODE_AXPY       x := x + p0 * z
 *   MODE_PERTURBED  x := y + p0 * z, and w := y + p1 * z when w is given (y read first: x may be y)
 *   MODE_UPDATE     x := x - (z * p0 [+ x * p2 where the row decays and use_decay]) * p1
 * with x, y, w in their dtypes (xdt, ydt, wdt), each loaded as float32 and stored rounded once. */
void zo_finish(const int64_t *rows, int64_t nrows, int64_t v0, int64_t n, const float *rad, const float *cs, int mode,
               void *x, int xdt, const void *y, int ydt, void *w, int wdt, float p0, float p1, float p2,
               int use_decay) {
    float z[TILE], v[TILE], r[TILE];
    for (pieces p = first_piece(rows, nrows, v0, n); next_piece(&p);) {
        const int decay = use_decay && p.row[R_DECAY] != 0;
        for (int64_t t = 0; t < p.m; t += TILE) {
            const int64_t mt = p.m - t < TILE ? p.m - t : TILE;
            const float *restrict rd = rad + p.k + t, *restrict c = cs + p.k + t;
            const int64_t at = p.row[R_POS] + p.off + t;
            for (int64_t j = 0; j < mt; j++)
                z[j] = rd[j] * c[j];
            switch (mode) {
            case MODE_NORMAL:
                store_tile(x, xdt, at, z, mt);
                break;
            case MODE_AXPY:
                load_tile(v, x, xdt, at, mt);
                for (int64_t j = 0; j < mt; j++)
                    v[j] = v[j] + z[j] * p0;
                store_tile(x, xdt, at, v, mt);
                break;
            case MODE_PERTURBED:
                load_tile(v, y, ydt, at, mt);
                if (w) {
                    for (int64_t j = 0; j < mt; j++)
                        r[j] = v[j] + z[j] * p1;
                }
                for (int64_t j = 0; j < mt; j++)
                    v[j] = v[j] + z[j] * p0;
                store_tile(x, xdt, at, v, mt);
                if (w)
                    store_tile(w, wdt, at, r, mt);
                break;
            default: /* MODE_UPDATE, zo.apply_update's order of operations */
                load_tile(v, x, xdt, at, mt);
                if (decay) {
                    for (int64_t j = 0; j < mt; j++) {
                        float step = z[j] * p0;
                        step = step + v[j] * p2;
                        v[j] = v[j] - step * p1;
                    }
                } else {
                    for (int64_t j = 0; j < mt; j++) {
                        float step = z[j] * p0;
                        v[j] = v[j] - step * p1;
                    }
                }
                store_tile(x, xdt, at, v, mt);
            }
        }
    }
}
