/* A small virtual machine for traced sampler steps (vilab.inference.engine.backends.vm).

   A program is a list of instructions over one arena of doubles. Each instruction loops over an
   N-d shape and reads or writes up to four strided operands (strides may be 0, a broadcast, or
   negative, a flip). Loads convert a caller's input (float32, float64, int64, int32 or bool) into
   the arena and stores convert arena values into a caller's output; everything between runs in
   double. Built once per installation, so a new model's step runs without compiling anything.
   Plain C with libm only: it builds in about a second. */
#define _USE_MATH_DEFINES
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAXD 6

typedef struct {
    int32_t op, nd, io, dtype;      /* io: the caller pointer of a load or store; dtype: its element type */
    int64_t shape[MAXD];
    int64_t off[4];
    int64_t st[4][MAXD];
    double p[4];
} Ins;

enum {
    ADD = 1, SUB, MUL, DIV, NEG, EXP, LOG, LOG1P, SQRT, SIGMOID, SOFTPLUS, LOGADDEXP, FMIN, FMAX, POW,
    CLAMP, WHERE, LT, LE, GT, GE, EQ, NE, AND, OR, NOT, XLOGY, NAN_TO_NUM, SIGMOID_BACKWARD,
    SOFTPLUS_BACKWARD, LOG_SIGMOID, LOG_SIGMOID_BACKWARD, COPY, FILL, SUM_ACC, MAX_ACC, OR_ACC,
    ARGMAX, CUMSUM, CUMPROD, CAST_F32, CAST_INT, CAST_BOOL, LOAD, STORE, ABS, TANH, EXPM1, RECIPROCAL,
    PROD_ACC, MIN_ACC, LOG_SIGMOID_BUFFER, LOGICAL_XOR, ISNAN, ISINF, SIGN, MUL_ACC, MAXIMUM, MINIMUM, ERF, ERFC, LGAMMA, DIGAMMA, ATAN, SIN, COS,
    SOLVE_TRIANGULAR, CHOLESKY, GATHER, SCATTER_ADD
};
enum { F64 = 0, F32 = 1, I64 = 2, I32 = 3, U8 = 4 };

static double load(const void* base, int dtype, int64_t i) {
    switch (dtype) {
        case F32: return (double)((const float*)base)[i];
        case I64: return (double)((const int64_t*)base)[i];
        case I32: return (double)((const int32_t*)base)[i];
        case U8: return (double)((const uint8_t*)base)[i];
        default: return ((const double*)base)[i];
    }
}

static void store(void* base, int dtype, int64_t i, double v) {
    switch (dtype) {
        case F32: ((float*)base)[i] = (float)v; break;
        case I64: ((int64_t*)base)[i] = (int64_t)v; break;
        case I32: ((int32_t*)base)[i] = (int32_t)v; break;
        case U8: ((uint8_t*)base)[i] = (uint8_t)(v != 0.0); break;
        default: ((double*)base)[i] = v;
    }
}

static double sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

static double logaddexp(double a, double b) {
    if (isinf(a) && a == b) return a;
    double m = a > b ? a : b;
    if (isnan(a) || isnan(b)) return NAN;
    return m + log1p(exp(-fabs(a - b)));
}

/* psi(x): recurrence up to 6, then the asymptotic series; reflection below 0. As PyTorch:
   psi(0) = -inf, psi(-0) = +inf, psi(-n) = NaN, psi(-inf) = NaN. */
static double digamma(double x) {
    if (isnan(x) || x == -INFINITY) return NAN;
    if (x == INFINITY) return INFINITY;
    if (x == 0.0) return signbit(x) ? INFINITY : -INFINITY;
    if (x < 0.0) {
        if (x == floor(x)) return NAN;
        return digamma(1.0 - x) - M_PI / tan(M_PI * x);
    }
    double shift = 0.0;
    while (x < 6.0) { shift -= 1.0 / x; x += 1.0; }
    const double f = 1.0 / (x * x);
    return shift + log(x) - 0.5 / x
        - f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f * (1.0 / 132)))));
}

static double max_nan(double a, double b) { return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b); }
static double min_nan(double a, double b) { return (isnan(a) || isnan(b)) ? NAN : (a < b ? a : b); }

/* The loop over an instruction's shape: ROWS runs ROW once per row of the last dimension (an
   odometer over the others) with the operands' row offsets po, pa, pb, pc, the row length inner
   and the operands' strides along it so, sa, sb, sc. INNER(BODY) is the usual row: BODY per
   element, with o, a, b, c the operands' element offsets and coord(d) the index along dimension
   d; rows of unit or zero strides get loops the compiler can vectorise. */
#define ROWS(ROW)                                                                               \
    do {                                                                                        \
        const int nd = I->nd;                                                                   \
        const int64_t inner = nd ? I->shape[nd - 1] : 1;                                        \
        const int64_t so = nd ? I->st[0][nd - 1] : 0, sa = nd ? I->st[1][nd - 1] : 0;           \
        const int64_t sb = nd ? I->st[2][nd - 1] : 0, sc = nd ? I->st[3][nd - 1] : 0;           \
        int64_t outer = 1, cnt[MAXD] = {0};                                                     \
        for (int d = 0; d < nd - 1; ++d) outer *= I->shape[d];                                  \
        int64_t po = I->off[0], pa = I->off[1], pb = I->off[2], pc = I->off[3];                 \
        for (int64_t t = 0; t < outer; ++t) {                                                   \
            ROW;                                                                                \
            for (int d = nd - 2; d >= 0; --d) {                                                 \
                if (++cnt[d] < I->shape[d]) {                                                   \
                    po += I->st[0][d]; pa += I->st[1][d]; pb += I->st[2][d]; pc += I->st[3][d]; \
                    break;                                                                      \
                }                                                                               \
                po -= I->st[0][d] * (I->shape[d] - 1); pa -= I->st[1][d] * (I->shape[d] - 1);   \
                pb -= I->st[2][d] * (I->shape[d] - 1); pc -= I->st[3][d] * (I->shape[d] - 1);   \
                cnt[d] = 0;                                                                     \
            }                                                                                   \
        }                                                                                       \
    } while (0)

#define INNER(BODY)                                                                             \
    if (so == 1 && sa == 1 && sb == 1 && sc == 1) {                                             \
        for (int64_t k = 0; k < inner; ++k) {                                                   \
            const int64_t o = po + k, a = pa + k, b = pb + k, c = pc + k; BODY; }               \
    } else if (so == 1 && sa == 1 && sb == 0 && sc == 0) {                                      \
        for (int64_t k = 0; k < inner; ++k) {                                                   \
            const int64_t o = po + k, a = pa + k, b = pb, c = pc; BODY; }                       \
    } else if (so == 1 && sa == 0 && sb == 1 && sc == 0) {                                      \
        for (int64_t k = 0; k < inner; ++k) {                                                   \
            const int64_t o = po + k, a = pa, b = pb + k, c = pc; BODY; }                       \
    } else if (so == 1 && sa == 1 && sb == 1 && sc == 0) {                                      \
        for (int64_t k = 0; k < inner; ++k) {                                                   \
            const int64_t o = po + k, a = pa + k, b = pb + k, c = pc; BODY; }                   \
    } else {                                                                                    \
        int64_t o = po, a = pa, b = pb, c = pc;                                                 \
        for (int64_t k = 0; k < inner; ++k, o += so, a += sa, b += sb, c += sc) { BODY; }       \
    }

#define LOOP(BODY) ROWS(INNER(BODY))

/* An accumulation whose output is one number per row (a reduction along the last dimension,
   the input at any stride): the row's total in a register, in order. */
#define ACCUMULATE(OP, BODY)                                                                    \
    ROWS(if (so == 0) {                                                                         \
        double acc = A[po];                                                                     \
        for (int64_t k = 0; k < inner; ++k) acc = OP(acc, A[pa + k * sa]);                     \
        A[po] = acc;                                                                            \
    } else { INNER(BODY) })

/* A sum (of TERM(i), i the offset of the k-th term) along the last dimension in four running
   totals: one total waits on each add's latency (nes leaf sums of 476 terms: 1.4 µs each with
   one, 0.5 with four). */
#define SUM_ROWS(TERM, BODY)                                                                    \
    ROWS(if (so == 0) {                                                                         \
        double s0 = 0.0; double s1 = 0.0; double s2 = 0.0; double s3 = 0.0; /* no commas: a macro argument */ \
        int64_t k = 0;                                                                          \
        for (; k + 4 <= inner; k += 4) {                                                        \
            s0 += TERM(k); s1 += TERM(k + 1); s2 += TERM(k + 2); s3 += TERM(k + 3);             \
        }                                                                                       \
        for (; k < inner; ++k) s0 += TERM(k);                                                   \
        A[po] += (s0 + s1) + (s2 + s3);                                                         \
    } else { INNER(BODY) })

#define SUM_TERM(k) A[pa + (k) * sa]
#define DOT_TERM(k) (A[pa + (k) * sa] * A[pb + (k) * sb])

#define TIMES(x, y) ((x) * (y))

/* The batch loop of a matrix instruction, whose last three dimensions are the matrix's (rows,
   rows or columns, columns: see vm_matrix.py) and the others its batch: BODY once per matrix
   with po, pa, pb the operands' offsets. */
#define MATRICES(...)                                                                           \
    do {                                                                                        \
        const int bd = I->nd - 3;                                                               \
        int64_t outer = 1, cnt[MAXD] = {0};                                                     \
        for (int d = 0; d < bd; ++d) outer *= I->shape[d];                                      \
        int64_t po = I->off[0], pa = I->off[1], pb = I->off[2];                                 \
        for (int64_t t = 0; t < outer; ++t) {                                                   \
            __VA_ARGS__;                                                                        \
            for (int d = bd - 1; d >= 0; --d) {                                                 \
                if (++cnt[d] < I->shape[d]) {                                                   \
                    po += I->st[0][d]; pa += I->st[1][d]; pb += I->st[2][d];                    \
                    break;                                                                      \
                }                                                                               \
                po -= I->st[0][d] * (I->shape[d] - 1); pa -= I->st[1][d] * (I->shape[d] - 1);   \
                pb -= I->st[2][d] * (I->shape[d] - 1);                                          \
                cnt[d] = 0;                                                                     \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* X = A^-1 B for a triangular A (n, n) and B, X (n, k) (LAPACK's trsm, left side): forward
   substitution for a lower A, backward for an upper one; a unit diagonal is not read. The loop's
   shape ends (n, n, k): rows of X and B, columns of A, columns of X and B. */
static void solve_triangular(const Ins* I, double* A, int upper, int unit) {
    const int nd = I->nd;
    const int64_t n = I->shape[nd - 3], k = I->shape[nd - 1];
    const int64_t xr = I->st[0][nd - 3], xc = I->st[0][nd - 1];
    const int64_t ar = I->st[1][nd - 3], ac = I->st[1][nd - 2];
    const int64_t br = I->st[2][nd - 3], bc = I->st[2][nd - 1];
    MATRICES(for (int64_t j = 0; j < k; ++j) {
        for (int64_t s = 0; s < n; ++s) {
            const int64_t i = upper ? n - 1 - s : s;
            const int64_t first = upper ? i + 1 : 0, last = upper ? n : i;
            double acc = A[pb + i * br + j * bc];
            for (int64_t l = first; l < last; ++l) acc -= A[pa + i * ar + l * ac] * A[po + l * xr + j * xc];
            A[po + i * xr + j * xc] = unit ? acc : acc / A[pa + i * ar + i * ac];
        }
    });
}

/* The lower Cholesky factor L of A (n, n), from A's lower triangle (Cholesky-Banachiewicz),
   zeros above the diagonal. Where A is not positive definite, L is all NaN (as in JAX) and the
   info operand (b) gets the order of the first minor that is not (LAPACK's potrf), else 0. The
   loop's shape ends (n, n, 1); an upper factor is the same instruction on transposed views. */
static void cholesky(const Ins* I, double* A) {
    const int nd = I->nd;
    const int64_t n = I->shape[nd - 3];
    const int64_t lr = I->st[0][nd - 3], lc = I->st[0][nd - 2];
    const int64_t ar = I->st[1][nd - 3], ac = I->st[1][nd - 2];
    MATRICES({
        int64_t failed = 0;
        for (int64_t i = 0; i < n && !failed; ++i) {
            for (int64_t j = 0; j <= i; ++j) {
                double s = A[pa + i * ar + j * ac];
                for (int64_t l = 0; l < j; ++l) s -= A[po + i * lr + l * lc] * A[po + j * lr + l * lc];
                if (i == j) {
                    if (!(s > 0.0)) { failed = i + 1; break; }
                    A[po + i * lr + i * lc] = sqrt(s);
                } else {
                    A[po + i * lr + j * lc] = s / A[po + j * lr + j * lc];
                }
            }
            for (int64_t j = i + 1; j < n; ++j) A[po + i * lr + j * lc] = 0.0;
        }
        if (failed)
            for (int64_t i = 0; i < n; ++i)
                for (int64_t j = 0; j < n; ++j) A[po + i * lr + j * lc] = NAN;
        A[pb] = (double)failed;
    });
}

#define coord(d) ((d) == nd - 1 ? k : cnt[(d)])

static void step(const Ins* I, double* A, void** io) {
    const double p0 = I->p[0], p1 = I->p[1], p2 = I->p[2];
    const int dim = (int)p0;
    switch (I->op) {
        case ADD: LOOP(A[o] = A[a] + A[b]); break;
        case SUB: LOOP(A[o] = A[a] - A[b]); break;
        case MUL: LOOP(A[o] = A[a] * A[b]); break;
        case DIV: LOOP(A[o] = A[a] / A[b]); break;
        case NEG: LOOP(A[o] = -A[a]); break;
        case ABS: LOOP(A[o] = fabs(A[a])); break;
        case EXP: LOOP(A[o] = exp(A[a])); break;
        case EXPM1: LOOP(A[o] = expm1(A[a])); break;
        case LOG: LOOP(A[o] = log(A[a])); break;
        case LOG1P: LOOP(A[o] = log1p(A[a])); break;
        case SQRT: LOOP(A[o] = sqrt(A[a])); break;
        case TANH: LOOP(A[o] = tanh(A[a])); break;
        case ERF: LOOP(A[o] = erf(A[a])); break;
        case ERFC: LOOP(A[o] = erfc(A[a])); break;
        case LGAMMA: LOOP(A[o] = lgamma(A[a])); break;
        case DIGAMMA: LOOP(A[o] = digamma(A[a])); break;
        case ATAN: LOOP(A[o] = atan(A[a])); break;
        case SIN: LOOP(A[o] = sin(A[a])); break;
        case COS: LOOP(A[o] = cos(A[a])); break;
        case RECIPROCAL: LOOP(A[o] = 1.0 / A[a]); break;
        case SIGN: LOOP(A[o] = (double)((A[a] > 0.0) - (A[a] < 0.0))); break;  /* sign(NaN) = 0, as in PyTorch */
        case SIGMOID: LOOP(A[o] = sigmoid(A[a])); break;
        /* p0 = beta, p1 = threshold */
        case SOFTPLUS: LOOP(A[o] = A[a] * p0 > p1 ? A[a] : log1p(exp(A[a] * p0)) / p0); break;
        case SOFTPLUS_BACKWARD: LOOP({ double z = exp(A[b] * p0);
                                       A[o] = A[b] * p0 > p1 ? A[a] : A[a] * z / (z + 1.0); }); break;
        case LOGADDEXP: LOOP(A[o] = logaddexp(A[a], A[b])); break;
        case FMIN: LOOP(A[o] = fmin(A[a], A[b])); break;
        case FMAX: LOOP(A[o] = fmax(A[a], A[b])); break;
        case POW:
            if (p0 == 2.0) LOOP(A[o] = A[a] * A[a]);
            else if (p0 == 0.5) LOOP(A[o] = sqrt(A[a]));
            else if (p0 == -1.0) LOOP(A[o] = 1.0 / A[a]);
            else LOOP(A[o] = pow(A[a], p0));
            break;
        /* p0, p1: bounds; p2: which are set (1 lower, 2 upper) */
        case CLAMP: LOOP({ double x = A[a];
                           if (!isnan(x)) { if (((int)p2 & 1) && x < p0) x = p0; if (((int)p2 & 2) && x > p1) x = p1; }
                           A[o] = x; }); break;
        case WHERE: LOOP(A[o] = A[a] != 0.0 ? A[b] : A[c]); break;
        case LT: LOOP(A[o] = A[a] < A[b]); break;
        case LE: LOOP(A[o] = A[a] <= A[b]); break;
        case GT: LOOP(A[o] = A[a] > A[b]); break;
        case GE: LOOP(A[o] = A[a] >= A[b]); break;
        case EQ: LOOP(A[o] = A[a] == A[b]); break;
        case NE: LOOP(A[o] = A[a] != A[b]); break;
        case AND: LOOP(A[o] = (A[a] != 0.0) && (A[b] != 0.0)); break;
        case OR: LOOP(A[o] = (A[a] != 0.0) || (A[b] != 0.0)); break;
        case LOGICAL_XOR: LOOP(A[o] = (A[a] != 0.0) != (A[b] != 0.0)); break;
        case NOT: LOOP(A[o] = A[a] == 0.0); break;
        case ISNAN: LOOP(A[o] = isnan(A[a])); break;
        case ISINF: LOOP(A[o] = isinf(A[a])); break;
        case XLOGY: LOOP(A[o] = isnan(A[b]) ? NAN : (A[a] == 0.0 ? 0.0 : A[a] * log(A[b]))); break;
        /* p0 = nan, p1 = posinf, p2 = neginf replacements */
        case NAN_TO_NUM: LOOP(A[o] = isnan(A[a]) ? p0 : (isinf(A[a]) ? (A[a] > 0 ? p1 : p2) : A[a])); break;
        case SIGMOID_BACKWARD: LOOP(A[o] = A[a] * A[b] * (1.0 - A[b])); break;
        case LOG_SIGMOID: LOOP(A[o] = fmin(A[a], 0.0) - log1p(exp(-fabs(A[a])))); break;
        case LOG_SIGMOID_BUFFER: LOOP(A[o] = exp(-fabs(A[a]))); break;
        case LOG_SIGMOID_BACKWARD: LOOP(A[o] = A[a] * sigmoid(-A[b])); break;
        case COPY: LOOP(A[o] = A[a]); break;
        case FILL: LOOP(A[o] = p0); break;
        case SUM_ACC: SUM_ROWS(SUM_TERM, A[o] += A[a]); break;
        case MUL_ACC: SUM_ROWS(DOT_TERM, A[o] += A[a] * A[b]); break;
        case MAXIMUM: LOOP(A[o] = max_nan(A[a], A[b])); break;
        case MINIMUM: LOOP(A[o] = min_nan(A[a], A[b])); break;
        case PROD_ACC: ACCUMULATE(TIMES, A[o] *= A[a]); break;
        case MAX_ACC: ACCUMULATE(max_nan, A[o] = max_nan(A[o], A[a])); break;
        case MIN_ACC: LOOP(A[o] = min_nan(A[o], A[a])); break;
        case OR_ACC: LOOP(A[o] = (A[o] != 0.0) || (A[a] != 0.0)); break;
        /* o: the index output (filled with -1), b: the reduced values, p0: the reduced dimension */
        case ARGMAX: LOOP(if (A[o] < 0.0 && (A[a] == A[b] || (isnan(A[a]) && isnan(A[b])))) A[o] = (double)coord(dim)); break;
        case CUMSUM: LOOP(A[o] = coord(dim) == 0 ? A[a] : A[o - I->st[0][dim]] + A[a]); break;
        case CUMPROD: LOOP(A[o] = coord(dim) == 0 ? A[a] : A[o - I->st[0][dim]] * A[a]); break;
        case CAST_F32: LOOP(A[o] = (double)(float)A[a]); break;
        case CAST_INT: LOOP(A[o] = trunc(A[a])); break;
        case CAST_BOOL: LOOP(A[o] = A[a] != 0.0); break;
        case LOAD: { const void* src = io[I->io]; LOOP(A[o] = load(src, I->dtype, a)); } break;
        case STORE: { void* dst = io[I->io]; LOOP(store(dst, I->dtype, o, A[a])); } break;
        /* p0: A is upper triangular; p1: its diagonal is ones */
        case SOLVE_TRIANGULAR: solve_triangular(I, A, p0 != 0.0, p1 != 0.0); break;
        case CHOLESKY: cholesky(I, A); break;
        /* b: the index; p0: the stride of a (GATHER) or o (SCATTER_ADD) along the indexed dimension */
        case GATHER: LOOP(A[o] = A[a + (int64_t)A[b] * (int64_t)p0]); break;
        case SCATTER_ADD: LOOP(A[o + (int64_t)A[b] * (int64_t)p0] += A[a]); break;
        default: break;
    }
    (void)p1; (void)p2; (void)dim;
}

/* Run ``count`` instructions; ``io`` holds the caller's input and output data pointers. */
void vilab_vm_run(const Ins* program, int64_t count, double* arena, void** io) {
    for (int64_t i = 0; i < count; ++i) step(program + i, arena, io);
}

/* The size of one instruction, so that the caller can check its layout. */
int64_t vilab_vm_instruction_size(void) { return (int64_t)sizeof(Ins); }
