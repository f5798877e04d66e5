/* The wmix128 lane sums in C: the same arithmetic as `streamer.checksum.lane_sums` (numpy),
 * one pass over the words instead of a dozen, with the GIL released.
 *
 *   x_i = w_i + (i + 1) * GAMMA          (w_i little-endian 64-bit words, i the word index)
 *   m_i = splitmix64 finaliser of x_i    (z ^= z >> 30; z *= C1; z ^= z >> 27; z *= C2; z ^= z >> 31)
 *   s1 = sum m_i,  s2 = sum (i + 1) * m_i                      (all mod 2**64)
 *
 * Optional: `streamer.checksum` falls back to numpy where this did not build, and the tests
 * hold the two to the same sums bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define GAMMA 0x9E3779B97F4A7C15ULL
#define C1 0xBF58476D1CE4E5B9ULL
#define C2 0x94D049BB133111EBULL

static inline uint64_t load_le(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, sizeof w);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}

static inline uint64_t mix(uint64_t z) {
    z ^= z >> 30;
    z *= C1;
    z ^= z >> 27;
    z *= C2;
    return z ^ (z >> 31);
}

static void lane_sums_c(const unsigned char *p, Py_ssize_t num_words, uint64_t start,
                        uint64_t *out1, uint64_t *out2) {
    /* Four lanes (words 4j + r), so the two multiplies of neighbouring words overlap. Within a
     * lane the weighted sum needs no multiply: with S the running sum and Q the sum of the
     * running sums before each word, sum_j j * m_j = (n - 1) * S - Q. */
    uint64_t sum[4] = {0, 0, 0, 0}, pre[4] = {0, 0, 0, 0};
    uint64_t off[4];
    for (int r = 0; r < 4; r++) {
        off[r] = (start + 1 + (uint64_t)r) * GAMMA;
    }
    const uint64_t step = 4 * GAMMA;
    Py_ssize_t groups = num_words / 4;
    for (Py_ssize_t j = 0; j < groups; j++) {
        const unsigned char *q = p + 32 * j;
        for (int r = 0; r < 4; r++) {
            uint64_t m = mix(load_le(q + 8 * r) + off[r]);
            pre[r] += sum[r];
            sum[r] += m;
            off[r] += step;
        }
    }
    uint64_t s1 = 0, s2 = 0;
    for (int r = 0; r < 4; r++) {
        uint64_t within = groups ? ((uint64_t)groups - 1) * sum[r] - pre[r] : 0;
        s1 += sum[r];
        s2 += (start + 1 + (uint64_t)r) * sum[r] + 4 * within;
    }
    for (Py_ssize_t k = 4 * groups; k < num_words; k++) {
        uint64_t pos = start + 1 + (uint64_t)k;
        uint64_t m = mix(load_le(p + 8 * k) + pos * GAMMA);
        s1 += m;
        s2 += pos * m;
    }
    *out1 = s1;
    *out2 = s2;
}

static PyObject *lane_sums(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned long long start;
    if (!PyArg_ParseTuple(args, "y*K", &view, &start)) {
        return NULL;
    }
    if (view.len % 8 != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "lane_sums takes whole 64-bit words (a multiple of 8 bytes)");
        return NULL;
    }
    uint64_t s1, s2;
    Py_BEGIN_ALLOW_THREADS
    lane_sums_c((const unsigned char *)view.buf, view.len / 8, (uint64_t)start, &s1, &s2);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("KK", (unsigned long long)s1, (unsigned long long)s2);
}

static PyMethodDef methods[] = {
    {"lane_sums", lane_sums, METH_VARARGS,
     "lane_sums(buffer, start) -> (s1, s2): wmix128's two lane sums of a buffer of whole "
     "little-endian 64-bit words taken as words start, start + 1, ... of a bucket."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "streamer._wmix", "wmix128 lane sums in C (see streamer.checksum).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__wmix(void) { return PyModule_Create(&module); }
