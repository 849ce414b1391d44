/* etl.native: the loops a message passes through, in C instead of Python.
 *
 * - read_records: the records of an uncompressed v2 record batch, as
 *   etl.kafka.fast_records.read_records_in_python reads them;
 * - plain: the contract's plain form of a message (etl.typed's typed lane) parsed into columns,
 *   where msgspec would decode it to the same values; anything else is left to msgspec;
 * - fields: the partitions, offsets and timestamps of a batch's messages as int64 columns;
 * - encode_rows: binary COPY rows from each column's (lengths, data), as
 *   etl.db.copy.encode_rows_numpy lays them out.
 *
 * The module is optional (setup.py): each caller keeps its Python way, used where this was not built
 * and held to this one by tests/test_native.py. Nothing here holds state or releases the GIL (each
 * call takes a few milliseconds a batch).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* -- encode_rows ------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer lengths;   /* int64, n values */
    Py_buffer data;      /* uint8: (n, width) matrix, or every present value's bytes back to back */
    Py_ssize_t width;    /* the matrix's width; -1 for a blob */
    const uint8_t *next; /* a blob's next value */
    const uint8_t *end;
} Column;

static void put_be32(uint8_t *at, int32_t v)
{
    uint32_t u = (uint32_t)v;
    at[0] = (uint8_t)(u >> 24);
    at[1] = (uint8_t)(u >> 16);
    at[2] = (uint8_t)(u >> 8);
    at[3] = (uint8_t)u;
}

static void release_columns(Column *cols, Py_ssize_t k)
{
    for (Py_ssize_t j = 0; j < k; j++) {
        PyBuffer_Release(&cols[j].lengths);
        PyBuffer_Release(&cols[j].data);
    }
}

static int get_column(PyObject *item, Column *col, Py_ssize_t index)
{
    PyObject *lengths, *data;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
        PyErr_Format(PyExc_TypeError, "column %zd is not a (lengths, data) tuple", index);
        return -1;
    }
    lengths = PyTuple_GET_ITEM(item, 0);
    data = PyTuple_GET_ITEM(item, 1);
    if (PyObject_GetBuffer(lengths, &col->lengths, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (col->lengths.ndim != 1 || col->lengths.itemsize != 8 || col->lengths.format == NULL ||
        (strcmp(col->lengths.format, "l") != 0 && strcmp(col->lengths.format, "q") != 0 &&
         strcmp(col->lengths.format, "<q") != 0 && strcmp(col->lengths.format, "=q") != 0)) {
        PyBuffer_Release(&col->lengths);
        PyErr_Format(PyExc_TypeError, "column %zd: lengths are not a contiguous native int64 array", index);
        return -1;
    }
    if (PyObject_GetBuffer(data, &col->data, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&col->lengths);
        return -1;
    }
    if (col->data.itemsize != 1 || (col->data.ndim != 1 && col->data.ndim != 2)) {
        release_columns(col, 1);
        PyErr_Format(PyExc_TypeError, "column %zd: data is not a contiguous uint8 array of 1 or 2 dimensions",
                     index);
        return -1;
    }
    col->width = col->data.ndim == 2 ? col->data.shape[1] : -1;
    col->next = (const uint8_t *)col->data.buf;
    col->end = col->next + col->data.len;
    return 0;
}

static PyObject *encode_rows(PyObject *self, PyObject *arg)
{
    PyObject *seq, *out = NULL;
    Column *cols;
    Py_ssize_t k, n = 0, total, i, j;
    uint8_t *at;
    (void)self;

    seq = PySequence_Fast(arg, "encode_rows takes a list of (lengths, data) columns");
    if (seq == NULL)
        return NULL;
    k = PySequence_Fast_GET_SIZE(seq);
    if (k == 0 || k > 0x7fff) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "encode_rows takes from 1 to 32767 columns");
        return NULL;
    }
    cols = PyMem_Calloc((size_t)k, sizeof(Column));
    if (cols == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (j = 0; j < k; j++) {
        if (get_column(PySequence_Fast_GET_ITEM(seq, j), &cols[j], j) < 0) {
            release_columns(cols, j);
            goto done;
        }
    }
    n = cols[0].lengths.len / 8;
    /* The size of the rows, and that each column has n rows and the bytes its lengths say */
    total = 2 * n;
    for (j = 0; j < k; j++) {
        const int64_t *len = (const int64_t *)cols[j].lengths.buf;
        Py_ssize_t bytes = 0;
        if (cols[j].lengths.len / 8 != n || (cols[j].width >= 0 && cols[j].data.shape[0] != n)) {
            PyErr_Format(PyExc_ValueError, "column %zd has another number of rows than column 0", j);
            goto fail;
        }
        for (i = 0; i < n; i++) {
            int64_t v = len[i];
            if (v < -1 || v > 0x7fffffff || (cols[j].width >= 0 && v >= 0 && v != cols[j].width)) {
                PyErr_Format(PyExc_ValueError, "column %zd, row %zd: length %lld does not fit its data", j, i,
                             (long long)v);
                goto fail;
            }
            if (v > 0)
                bytes += (Py_ssize_t)v;
        }
        if (cols[j].width < 0 && bytes > cols[j].data.len) {
            PyErr_Format(PyExc_ValueError, "column %zd: the lengths add up to %zd bytes, the data has %zd", j,
                         bytes, cols[j].data.len);
            goto fail;
        }
        total += 4 * n + (cols[j].width >= 0 ? 0 : bytes);
        if (cols[j].width > 0) {
            for (i = 0; i < n; i++)
                total += len[i] > 0 ? cols[j].width : 0;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        goto fail;
    at = (uint8_t *)PyBytes_AS_STRING(out);
    for (i = 0; i < n; i++) {
        at[0] = (uint8_t)(k >> 8);
        at[1] = (uint8_t)k;
        at += 2;
        for (j = 0; j < k; j++) {
            int64_t v = ((const int64_t *)cols[j].lengths.buf)[i];
            put_be32(at, (int32_t)v);
            at += 4;
            if (v <= 0)
                continue;
            if (cols[j].width >= 0) {
                memcpy(at, (const uint8_t *)cols[j].data.buf + i * cols[j].width, (size_t)v);
            } else {
                memcpy(at, cols[j].next, (size_t)v);
                cols[j].next += v;
            }
            at += v;
        }
    }
fail:
    release_columns(cols, k);
done:
    PyMem_Free(cols);
    Py_DECREF(seq);
    return out;
}

/* -- read_records ------------------------------------------------------------------------------ */

/* The zigzag varint at buf[*pos]: 0, or -1 when it runs past the end or past nine bytes (a value
 * the Python reader would take is then read by it, not here). */
static int varint(const uint8_t *buf, Py_ssize_t len, Py_ssize_t *pos, int64_t *value)
{
    uint64_t result = 0;
    int shift = 0;
    Py_ssize_t p = *pos;
    for (;;) {
        uint8_t b;
        if (p >= len || shift > 56)
            return -1;
        b = buf[p++];
        result |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            break;
        shift += 7;
    }
    *pos = p;
    *value = (int64_t)(result >> 1) ^ -(int64_t)(result & 1);
    return 0;
}

/* bytes of buf[*pos:*pos + n], or Py_None for n < 0; NULL (no error set) when out of bounds. */
static PyObject *bytes_or_none(const uint8_t *buf, Py_ssize_t len, Py_ssize_t *pos, int64_t n)
{
    PyObject *out;
    if (n < 0)
        Py_RETURN_NONE;
    if (n > len - *pos)
        return NULL;
    out = PyBytes_FromStringAndSize((const char *)buf + *pos, (Py_ssize_t)n);
    *pos += (Py_ssize_t)n;
    return out;
}

/* A record's headers as a tuple of (name, value or None); NULL with no error set when malformed. */
static PyObject *read_headers(const uint8_t *buf, Py_ssize_t len, Py_ssize_t *pos)
{
    int64_t count, h;
    PyObject *found, *name, *value, *pair;
    if (varint(buf, len, pos, &count) < 0 || count < 0 || count > len)
        return NULL;
    if (count == 0)
        return PyTuple_New(0);
    found = PyTuple_New((Py_ssize_t)count);
    if (found == NULL)
        return NULL;
    for (int64_t i = 0; i < count; i++) {
        if (varint(buf, len, pos, &h) < 0 || h < 0 || h > len - *pos)
            goto malformed;
        name = PyUnicode_DecodeUTF8((const char *)buf + *pos, (Py_ssize_t)h, "strict");
        if (name == NULL) {
            PyErr_Clear();
            goto malformed;
        }
        *pos += (Py_ssize_t)h;
        if (varint(buf, len, pos, &h) < 0 || (value = bytes_or_none(buf, len, pos, h)) == NULL) {
            Py_DECREF(name);
            goto malformed;
        }
        pair = PyTuple_Pack(2, name, value);
        Py_DECREF(name);
        Py_DECREF(value);
        if (pair == NULL)
            goto malformed;
        PyTuple_SET_ITEM(found, (Py_ssize_t)i, pair);
    }
    return found;
malformed:
    Py_DECREF(found);
    return NULL;
}

static PyObject *read_records(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, count, len;
    PyObject *topic, *partition, *log_append, *record_type;
    long long base_offset, first_timestamp;
    PyObject *out = NULL, *ts = NULL, *result = NULL;
    const uint8_t *buf;
    int64_t last_delta = 0, size = 0;
    int have_last = 0;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*nnOOLLOO:read_records", &view, &pos, &count, &topic, &partition,
                          &base_offset, &first_timestamp, &log_append, &record_type))
        return NULL;
    if (!PyType_Check(record_type) || !PyType_IsSubtype((PyTypeObject *)record_type, &PyTuple_Type)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "read_records: the record type must be a tuple subclass");
        return NULL;
    }
    buf = (const uint8_t *)view.buf;
    len = view.len;
    if (count < 0 || pos < 0 || pos > len || count > len - pos)
        goto malformed;
    if (log_append != Py_None) {
        long long stamp = PyLong_AsLongLong(log_append);
        if (stamp == -1 && PyErr_Occurred())
            goto done;
        if (stamp < 0) {
            ts = Py_None;
            Py_INCREF(ts);
        } else {
            ts = log_append;
            Py_INCREF(ts);
        }
    }
    out = PyList_New(count);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t length, attributes, ts_delta, offset_delta, n, offset;
        Py_ssize_t start;
        PyObject *key, *value, *headers, *record, *off;
        if (varint(buf, len, &pos, &length) < 0)
            goto malformed;
        start = pos;
        if (varint(buf, len, &pos, &attributes) < 0 || varint(buf, len, &pos, &ts_delta) < 0 ||
            varint(buf, len, &pos, &offset_delta) < 0 || varint(buf, len, &pos, &n) < 0)
            goto malformed;
        (void)attributes;
        key = bytes_or_none(buf, len, &pos, n);
        if (key == NULL)
            goto malformed;
        if (varint(buf, len, &pos, &n) < 0 || (value = bytes_or_none(buf, len, &pos, n)) == NULL) {
            Py_DECREF(key);
            goto malformed;
        }
        if (pos < len && buf[pos] == 0) {
            pos++;
            headers = PyTuple_New(0);
        } else {
            headers = read_headers(buf, len, &pos);
        }
        if (headers == NULL || pos - start != length || __builtin_add_overflow(base_offset, offset_delta, &offset) ||
            (off = PyLong_FromLongLong(offset)) == NULL) {
            Py_DECREF(key);
            Py_DECREF(value);
            Py_XDECREF(headers);
            goto malformed;
        }
        if (log_append == Py_None && (!have_last || ts_delta != last_delta)) {
            int64_t stamp;
            have_last = 1;
            last_delta = ts_delta;
            Py_XDECREF(ts);
            if (__builtin_add_overflow((int64_t)first_timestamp, ts_delta, &stamp)) {
                ts = NULL;
                Py_DECREF(key);
                Py_DECREF(value);
                Py_DECREF(headers);
                Py_DECREF(off);
                goto malformed;
            }
            ts = stamp < 0 ? (Py_INCREF(Py_None), Py_None) : PyLong_FromLongLong(stamp);
        }
        record = ts == NULL ? NULL : ((PyTypeObject *)record_type)->tp_alloc((PyTypeObject *)record_type, 7);
        if (record == NULL) {
            Py_DECREF(key);
            Py_DECREF(value);
            Py_DECREF(headers);
            Py_DECREF(off);
            goto done;
        }
        Py_INCREF(topic);
        Py_INCREF(partition);
        Py_INCREF(ts);
        PyTuple_SET_ITEM(record, 0, topic);
        PyTuple_SET_ITEM(record, 1, partition);
        PyTuple_SET_ITEM(record, 2, off);
        PyTuple_SET_ITEM(record, 3, ts);
        PyTuple_SET_ITEM(record, 4, key);
        PyTuple_SET_ITEM(record, 5, value);
        PyTuple_SET_ITEM(record, 6, headers);
        PyList_SET_ITEM(out, i, record);
        size += length;
    }
    if (pos != len)
        goto malformed;
    result = Py_BuildValue("(OL)", out, (long long)size);
    goto done;
malformed: /* not an error: None, and the Python reader decides what these bytes are */
    if (!PyErr_Occurred()) { /* unless an allocation on the way failed */
        result = Py_None;
        Py_INCREF(result);
    }
done:
    Py_XDECREF(out);
    Py_XDECREF(ts);
    PyBuffer_Release(&view);
    return result;
}

/* -- fields: the columns a batch's messages carry beside their payloads -------------------------- */

/* bytearray of n int64 values (a buffer numpy can write to), or NULL. */
static PyObject *int64s(Py_ssize_t n)
{
    return PyByteArray_FromStringAndSize(NULL, n * 8);
}

static int int64_of(PyObject *value, int64_t *out)
{
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = (int64_t)v;
    return 0;
}

static PyObject *fields(PyObject *self, PyObject *arg)
{
    PyObject *seq, *parts = NULL, *offsets = NULL, *stamps = NULL, *topic = Py_None, *out = NULL;
    Py_ssize_t n, i;
    int odd = 0;
    (void)self;

    seq = PySequence_Fast(arg, "fields takes a list of messages");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    parts = int64s(n);
    offsets = int64s(n);
    stamps = int64s(n);
    if (parts == NULL || offsets == NULL || stamps == NULL)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *m = PySequence_Fast_GET_ITEM(seq, i), *ts;
        int64_t *stamp = (int64_t *)PyByteArray_AS_STRING(stamps) + i;
        if (!PyTuple_Check(m) || PyTuple_GET_SIZE(m) < 4) {
            PyErr_Format(PyExc_TypeError, "message %zd is not a RawMessage", i);
            goto done;
        }
        if (int64_of(PyTuple_GET_ITEM(m, 1), (int64_t *)PyByteArray_AS_STRING(parts) + i) < 0 ||
            int64_of(PyTuple_GET_ITEM(m, 2), (int64_t *)PyByteArray_AS_STRING(offsets) + i) < 0)
            goto done;
        if (i == 0) {
            topic = PyTuple_GET_ITEM(m, 0);
        } else if (topic != Py_None && PyTuple_GET_ITEM(m, 0) != topic) {
            int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(m, 0), topic, Py_EQ);
            if (same < 0)
                goto done;
            if (!same)
                topic = Py_None;
        }
        ts = PyTuple_GET_ITEM(m, 3);
        *stamp = INT64_MIN;
        if (PyLong_CheckExact(ts)) {
            int overflow;
            long long v = PyLong_AsLongLongAndOverflow(ts, &overflow);
            if (overflow || (v == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                odd = 1;
            } else {
                *stamp = (int64_t)v;
            }
        } else if (ts != Py_None) {
            odd = 1;
        }
    }
    out = Py_BuildValue("(OOOOO)", parts, offsets, stamps, n ? topic : Py_None, odd ? Py_True : Py_False);
done:
    Py_XDECREF(parts);
    Py_XDECREF(offsets);
    Py_XDECREF(stamps);
    Py_DECREF(seq);
    return out;
}

/* -- plain: the contract's plain form of a message, parsed into columns ------------------------- */

/* Field bits of plain()'s flags. */
enum {
    STATUS_PRESENT = 1,
    TIMING_PRESENT = 2,
    MATCHED_PRESENT = 4,
    MATCHED_TRUE = 8,
    ERROR_PRESENT = 16,
    CHECKED_AT_TEXT = 32,
    CHECKED_AT_READ = 64, /* a checked_at text read into microseconds (no str made) */
};

enum { F_URL, F_CHECKED_AT, F_STATUS, F_TIMING, F_PATTERN, F_MATCHED, F_ERROR, F_COUNT };
static const char *const FIELD_NAMES[F_COUNT] = {
    "url", "checked_at", "status_code", "response_time_ms", "regex_pattern", "regex_matched", "error",
};

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Cursor;

static void skip_ws(Cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

/* A string with nothing escaped and no control character: its bytes (between the quotes). */
static int plain_string(Cursor *c, const uint8_t **start, Py_ssize_t *len)
{
    const uint8_t *p;
    if (c->p >= c->end || *c->p != '"')
        return -1;
    p = ++c->p;
    while (p < c->end && *p != '"') {
        if (*p == '\\' || *p < 0x20)
            return -1;
        p++;
    }
    if (p >= c->end)
        return -1;
    *start = c->p;
    *len = p - c->p;
    c->p = p + 1;
    return 0;
}

/* A JSON number: 1 for an integer (no fraction, no exponent), 0 for another, -1 for none. */
static int number(Cursor *c, const uint8_t **start, Py_ssize_t *len)
{
    const uint8_t *p = c->p;
    int integer = 1;
    if (p < c->end && *p == '-')
        p++;
    if (p >= c->end || *p < '0' || *p > '9')
        return -1;
    if (*p == '0') {
        p++;
    } else {
        while (p < c->end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < c->end && *p == '.') {
        integer = 0;
        p++;
        if (p >= c->end || *p < '0' || *p > '9')
            return -1;
        while (p < c->end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < c->end && (*p == 'e' || *p == 'E')) {
        integer = 0;
        p++;
        if (p < c->end && (*p == '+' || *p == '-'))
            p++;
        if (p >= c->end || *p < '0' || *p > '9')
            return -1;
        while (p < c->end && *p >= '0' && *p <= '9')
            p++;
    }
    *start = c->p;
    *len = p - c->p;
    c->p = p;
    return integer;
}

static const double POWERS_OF_TEN[] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

/* The double a number's text stands for (correctly rounded); -1 when not finite.
 *
 * A number of at most 15 digits and a decimal exponent within 22 is one exact double times or over
 * another, which IEEE arithmetic rounds correctly (Clinger's fast path); others are read by
 * PyOS_string_to_double. */
static int to_double(const uint8_t *start, Py_ssize_t len, double *out)
{
    char text[64];
    char *stop;
    const uint8_t *p = start, *end = start + len;
    uint64_t mantissa = 0;
    int digits = 0, exponent = 0, negative = 0;
    if (p < end && *p == '-') {
        negative = 1;
        p++;
    }
    for (; p < end && *p >= '0' && *p <= '9'; p++, digits++)
        mantissa = mantissa * 10 + (uint64_t)(*p - '0');
    if (p < end && *p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++, digits++, exponent--)
            mantissa = mantissa * 10 + (uint64_t)(*p - '0');
    }
    if (p == end && digits <= 15 && exponent >= -22) {
        double value = (double)mantissa;
        if (exponent == 0 && mantissa == 0)
            negative = 0; /* the integer -0 is 0, as msgspec gives it for a float field */
        value = exponent < 0 ? value / POWERS_OF_TEN[-exponent] : value;
        *out = negative ? -value : value;
        return 0;
    }
    if (len >= (Py_ssize_t)sizeof(text))
        return -1;
    memcpy(text, start, (size_t)len);
    text[len] = '\0';
    *out = PyOS_string_to_double(text, &stop, NULL);
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (stop != text + len || !isfinite(*out))
        return -1;
    return 0;
}

static int literal(Cursor *c, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0)
        return -1;
    c->p += n;
    return 0;
}

static int field_of(const uint8_t *name, Py_ssize_t len)
{
    if (len < 3 || len > 16)
        return -1;
    for (int f = 0; f < F_COUNT; f++) {
        if ((size_t)len == strlen(FIELD_NAMES[f]) && memcmp(name, FIELD_NAMES[f], (size_t)len) == 0)
            return f;
    }
    return -1;
}

static int two_digits(const uint8_t *p)
{
    if (p[0] < '0' || p[0] > '9' || p[1] < '0' || p[1] > '9')
        return -1;
    return (p[0] - '0') * 10 + (p[1] - '0');
}

/* Days from 1970-01-01 to a date of the proleptic Gregorian calendar. */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    int64_t era, yoe, doy, doe;
    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* A time written YYYY-MM-DDTHH:MM:SS, then up to six digits of a second, then Z or +00:00: its
 * microseconds since 1970 in *us, 0; -1 for any other text (which pandas then reads). */
static int iso_utc_us(const uint8_t *p, Py_ssize_t len, int64_t *us)
{
    static const int DAYS[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int year, month, day, hour, minute, second, leap, hi, lo;
    int64_t fraction = 0;
    Py_ssize_t at = 19, digits = 0;
    if (len < 20 || p[4] != '-' || p[7] != '-' || p[10] != 'T' || p[13] != ':' || p[16] != ':')
        return -1;
    if ((hi = two_digits(p)) < 0 || (lo = two_digits(p + 2)) < 0)
        return -1;
    year = hi * 100 + lo;
    month = two_digits(p + 5);
    day = two_digits(p + 8);
    hour = two_digits(p + 11);
    minute = two_digits(p + 14);
    second = two_digits(p + 17);
    if (month < 1 || month > 12 || day < 1 || hour < 0 || hour > 23 || minute < 0 || minute > 59 ||
        second < 0 || second > 59)
        return -1;
    leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day > DAYS[month - 1] + (month == 2 && leap))
        return -1;
    if (p[at] == '.') {
        for (at++; at < len && p[at] >= '0' && p[at] <= '9'; at++, digits++) {
            if (digits == 6)
                return -1;
            fraction = fraction * 10 + (p[at] - '0');
        }
        if (digits == 0)
            return -1;
        for (Py_ssize_t k = digits; k < 6; k++)
            fraction *= 10;
    }
    if (!((len - at == 1 && p[at] == 'Z') || (len - at == 6 && memcmp(p + at, "+00:00", 6) == 0)))
        return -1;
    *us = ((days_from_civil(year, month, day) * 24 + hour) * 60 + minute) * 60 + second;
    *us = *us * 1000000 + fraction;
    return 0;
}

typedef struct {
    PyObject *url, *checked_text, *pattern, *error; /* new references or NULL */
    int64_t checked_us;
    double checked_number, timing;
    int64_t status;
    uint8_t flags;
} Row;

static void clear_row(Row *r)
{
    Py_CLEAR(r->url);
    Py_CLEAR(r->checked_text);
    Py_CLEAR(r->pattern);
    Py_CLEAR(r->error);
}

/* The texts of one plain() call, by their bytes: a batch repeats its URLs, patterns and errors, and
 * one str for each (its hash computed once) is cheaper to make and to factorize than one a message.
 * A slot holds the last text whose bytes hashed to it; the bytes it points to are in a payload the
 * call holds. */
#define TEXT_SLOTS 4096
typedef struct {
    const uint8_t *bytes;
    Py_ssize_t len;
    PyObject *str; /* a reference the cache owns */
} TextSlot;

typedef struct {
    TextSlot slot[TEXT_SLOTS];
} Texts;

static void texts_clear(Texts *t)
{
    for (int i = 0; i < TEXT_SLOTS; i++)
        Py_CLEAR(t->slot[i].str);
}

/* A str from a plain string's bytes (a new reference); NULL (no error set) when they are not
 * valid UTF-8. */
static PyObject *text(Texts *t, const uint8_t *start, Py_ssize_t len)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    TextSlot *slot;
    PyObject *s;
    for (Py_ssize_t i = 0; i < len; i++)
        h = (h ^ start[i]) * 1099511628211ULL;
    slot = &t->slot[(h ^ (h >> 32)) & (TEXT_SLOTS - 1)];
    if (slot->str != NULL && slot->len == len && memcmp(slot->bytes, start, (size_t)len) == 0) {
        Py_INCREF(slot->str);
        return slot->str;
    }
    s = PyUnicode_DecodeUTF8((const char *)start, len, "strict");
    if (s == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_XSETREF(slot->str, s);
    Py_INCREF(s);
    slot->bytes = start;
    slot->len = len;
    return s;
}

/* 0 when the message is the plain form and *r holds its values; -1 when it is not (r cleared). */
static int parse_plain(Texts *texts, const uint8_t *buf, Py_ssize_t len, Row *r)
{
    Cursor c = {buf, buf + len};
    const uint8_t *start;
    Py_ssize_t n;
    unsigned seen = 0;
    int f, kind;
    memset(r, 0, sizeof(*r));
    skip_ws(&c);
    if (c.p >= c.end || *c.p++ != '{')
        return -1;
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}')
        goto fail; /* {}: url and checked_at are required */
    for (;;) {
        skip_ws(&c);
        if (plain_string(&c, &start, &n) < 0 || (f = field_of(start, n)) < 0 || (seen & (1u << f)))
            goto fail;
        seen |= 1u << f;
        skip_ws(&c);
        if (c.p >= c.end || *c.p++ != ':')
            goto fail;
        skip_ws(&c);
        if (c.p >= c.end)
            goto fail;
        if (*c.p == 'n') { /* null: the fields that may be null are absent */
            if (literal(&c, "null") < 0 || f == F_URL || f == F_CHECKED_AT)
                goto fail;
        } else if (f == F_URL || f == F_PATTERN || f == F_ERROR || (f == F_CHECKED_AT && *c.p == '"')) {
            PyObject *s;
            if (plain_string(&c, &start, &n) < 0)
                goto fail;
            if (f == F_CHECKED_AT && iso_utc_us(start, n, &r->checked_us) == 0) {
                r->flags |= CHECKED_AT_TEXT | CHECKED_AT_READ;
                goto next;
            }
            if ((s = text(texts, start, n)) == NULL)
                goto fail;
            if (f == F_URL)
                r->url = s;
            else if (f == F_PATTERN)
                r->pattern = s;
            else if (f == F_ERROR) {
                r->error = s;
                r->flags |= ERROR_PRESENT;
            } else {
                r->checked_text = s;
                r->flags |= CHECKED_AT_TEXT;
            }
        } else if (f == F_MATCHED) {
            if (literal(&c, "true") == 0)
                r->flags |= MATCHED_PRESENT | MATCHED_TRUE;
            else if (literal(&c, "false") == 0)
                r->flags |= MATCHED_PRESENT;
            else
                goto fail;
        } else {
            kind = number(&c, &start, &n);
            if (kind < 0)
                goto fail;
            if (f == F_STATUS) { /* an integer of at most 18 digits: beyond, the slow lane decides */
                char digits[24];
                if (kind != 1 || n > 18)
                    goto fail;
                memcpy(digits, start, (size_t)n);
                digits[n] = '\0';
                r->status = strtoll(digits, NULL, 10);
                r->flags |= STATUS_PRESENT;
            } else if (f == F_TIMING) {
                if (to_double(start, n, &r->timing) < 0)
                    goto fail;
                r->flags |= TIMING_PRESENT;
            } else { /* checked_at as epoch seconds or milliseconds */
                if (to_double(start, n, &r->checked_number) < 0)
                    goto fail;
            }
        }
    next:
        skip_ws(&c);
        if (c.p < c.end && *c.p == ',') {
            c.p++;
            continue;
        }
        if (c.p < c.end && *c.p == '}') {
            c.p++;
            break;
        }
        goto fail;
    }
    skip_ws(&c);
    if (c.p != c.end || !(seen & (1u << F_URL)) || !(seen & (1u << F_CHECKED_AT)))
        goto fail;
    return 0;
fail:
    clear_row(r);
    return -1;
}

static PyObject *plain(PyObject *self, PyObject *arg)
{
    PyObject *seq, *out = NULL;
    Texts *cache;
    PyObject *cleared = NULL, *urls = NULL, *texts = NULL, *numbers = NULL, *statuses = NULL,
             *timings = NULL, *flags = NULL, *patterns = NULL, *errors = NULL, *micros = NULL;
    Py_ssize_t n, i;
    (void)self;

    seq = PySequence_Fast(arg, "plain takes a list of payloads");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    cache = PyMem_Calloc(1, sizeof(Texts));
    if (cache == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    cleared = PyBytes_FromStringAndSize(NULL, n);
    numbers = PyBytes_FromStringAndSize(NULL, n * 8);
    statuses = PyBytes_FromStringAndSize(NULL, n * 8);
    timings = PyBytes_FromStringAndSize(NULL, n * 8);
    flags = PyBytes_FromStringAndSize(NULL, n);
    micros = PyBytes_FromStringAndSize(NULL, n * 8);
    urls = PyList_New(n);
    texts = PyList_New(n);
    patterns = PyList_New(n);
    errors = PyList_New(n);
    if (!cleared || !numbers || !statuses || !timings || !flags || !micros || !urls || !texts || !patterns ||
        !errors)
        goto done;
    for (i = 0; i < n; i++) {
        PyObject *payload = PySequence_Fast_GET_ITEM(seq, i);
        Row r;
        int ok = PyBytes_Check(payload) &&
                 parse_plain(cache, (const uint8_t *)PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload), &r) == 0;
        if (!ok)
            memset(&r, 0, sizeof(r));
        PyBytes_AS_STRING(cleared)[i] = (char)ok;
        ((double *)PyBytes_AS_STRING(numbers))[i] = ok && !r.checked_text ? r.checked_number : Py_NAN;
        ((int64_t *)PyBytes_AS_STRING(statuses))[i] = r.status;
        ((int64_t *)PyBytes_AS_STRING(micros))[i] = r.flags & CHECKED_AT_READ ? r.checked_us : INT64_MIN;
        ((double *)PyBytes_AS_STRING(timings))[i] = r.flags & TIMING_PRESENT ? r.timing : Py_NAN;
        PyBytes_AS_STRING(flags)[i] = (char)r.flags;
#define PUT(list, value) PyList_SET_ITEM(list, i, (value) ? (value) : (Py_INCREF(Py_None), Py_None))
        PUT(urls, r.url);
        PUT(texts, r.checked_text);
        PUT(patterns, r.pattern);
        PUT(errors, r.error);
#undef PUT
    }
    out = PyTuple_Pack(10, cleared, urls, texts, numbers, statuses, timings, flags, patterns, errors, micros);
done:
    Py_XDECREF(cleared);
    Py_XDECREF(urls);
    Py_XDECREF(texts);
    Py_XDECREF(numbers);
    Py_XDECREF(statuses);
    Py_XDECREF(timings);
    Py_XDECREF(flags);
    Py_XDECREF(patterns);
    Py_XDECREF(errors);
    Py_XDECREF(micros);
    texts_clear(cache);
    PyMem_Free(cache);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"fields", fields, METH_O,
     "fields(messages) -> (partitions, offsets, timestamps, topic, odd): int64 columns (bytearrays) of "
     "the messages' partitions, offsets and timestamps (INT64_MIN for None), the topic when they share "
     "one (else None), and whether a timestamp was neither None nor an int64 (then read them in Python)."},
    {"encode_rows", encode_rows, METH_O,
     "encode_rows(columns) -> bytes: binary COPY rows from each column's (lengths, data)."},
    {"read_records", read_records, METH_VARARGS,
     "read_records(buf, pos, count, topic, partition, base_offset, first_timestamp, log_append_time, "
     "record_type) -> (records, size), or None when the bytes are not a well-formed run of records."},
    {"plain", plain, METH_O,
     "plain(payloads) -> (cleared, urls, checked_at texts, checked_at numbers, status codes, response "
     "times, flags, regex patterns, errors, checked_at microseconds): the messages in the contract's "
     "plain form, parsed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "etl.native", "The per-message loops of etl, in C (see etl/native.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_native(void)
{
    return PyModule_Create(&module);
}
