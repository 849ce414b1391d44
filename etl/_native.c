/* etl._native: the two loops a message passes through in C instead of Python.
 *
 * - encode_rows: binary COPY rows from each column's (lengths, data), as etl.db.copy.encode_rows;
 * - read_records: the records of an uncompressed v2 record batch, as
 *   etl.kafka.fast_records.read_records.
 *
 * Each is a drop-in for the Python function of the same name, which stays as the fallback when this
 * module was not built (no C compiler where the package was installed) and as the reference its
 * tests hold it to. Neither holds state; neither releases the GIL (each call is a few milliseconds).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
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
    int have_last = 0, failed = 0;
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
            if (ts == NULL) {
                failed = 1;
            }
        }
        record = failed ? NULL : ((PyTypeObject *)record_type)->tp_alloc((PyTypeObject *)record_type, 7);
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
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(out);
    Py_XDECREF(ts);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_rows", encode_rows, METH_O,
     "encode_rows(columns) -> bytes: binary COPY rows from each column's (lengths, data)."},
    {"read_records", read_records, METH_VARARGS,
     "read_records(buf, pos, count, topic, partition, base_offset, first_timestamp, log_append_time, "
     "record_type) -> (records, size), or None when the bytes are not a well-formed run of records."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "etl._native", "The per-message loops of etl, in C (see etl/_native.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
