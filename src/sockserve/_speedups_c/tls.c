/* sockserve._speedups: tls_serve, one readable event of a TLS connection on the hub in one
 * call (server/tlsconn.py is its caller and its pure-Python twin, TlsStream._pass).
 *
 * tls_serve(fd, sslobj, bio_in, bio_out, member, handler, ctx, max_message) -> (tag, value)
 *
 * sslobj is the _ssl object under an ssl.SSLObject (its read/write/pending), bio_in and
 * bio_out its ssl.MemoryBIOs. One recv of up to MAX_SIZE bytes into bio_in; every whole
 * record decrypted; their plaintext, joined, is one raw request: member.active = True,
 * handler(request, ctx), an exact bytes reply encrypted and what bio_out holds sent in one
 * send. Only the socket, the BIOs and the _ssl object are touched, through their C-level
 * methods: no Python frame but the handler's. Tags (fastio's, and two of its own):
 * DONE (0) all done; DATA (2) plaintext longer than max_message; EOF (3) end of stream;
 * ERRNO (4) recv's or send's errno; RAISED (5) what the handler raised; REPLY (6) a reply
 * that is not exact bytes, or the connection is no longer at fd; PARTIAL (7) ciphertext
 * the kernel did not take; TLS_ERROR (8) the SSLError of a read or write; TLS_CLOSED (9)
 * close_notify came, value the plaintext before it. The caller finishes each.
 */
#include "speedups.h"

#include <errno.h>

/* The ssl exceptions and method names in the module state, looked up at the first call
 * (the caller has imported ssl). */
static int
tls_init(state_t *st)
{
    tls_names_t *t = &st->tls;
    if (t->s_fd != NULL) {
        return 0;
    }
    PyObject *ssl = PyImport_ImportModule("ssl");
    if (ssl == NULL) {
        return -1;
    }
    t->want_read = PyObject_GetAttrString(ssl, "SSLWantReadError");
    t->zero_return = PyObject_GetAttrString(ssl, "SSLZeroReturnError");
    Py_DECREF(ssl);
    t->s_read = PyUnicode_InternFromString("read");
    t->s_write = PyUnicode_InternFromString("write");
    t->s_pending = PyUnicode_InternFromString("pending");
    if (t->want_read == NULL || t->zero_return == NULL || t->s_read == NULL ||
        t->s_write == NULL || t->s_pending == NULL) {
        tls_clear(st);
        return -1;
    }
    t->s_fd = PyUnicode_InternFromString("fd");
    return t->s_fd == NULL ? -1 : 0;
}

HIDDEN void
tls_clear(state_t *st)
{
    Py_CLEAR(st->tls.want_read);
    Py_CLEAR(st->tls.zero_return);
    Py_CLEAR(st->tls.s_read);
    Py_CLEAR(st->tls.s_write);
    Py_CLEAR(st->tls.s_pending);
    Py_CLEAR(st->tls.s_fd);
}

/* bio.pending (a property) or sslobj.pending() (a method) as a C number; -1 on error. */
static Py_ssize_t
pending_of(const tls_names_t *names, PyObject *obj, int method)
{
    PyObject *n = method ? PyObject_CallMethodNoArgs(obj, names->s_pending)
                         : PyObject_GetAttr(obj, names->s_pending);
    if (n == NULL) {
        return -1;
    }
    Py_ssize_t v = PyLong_AsSsize_t(n);
    Py_DECREF(n);
    return v;
}

static PyObject *
outcome(int tag, PyObject *value)
{
    if (value == NULL) {
        value = Py_None;
        Py_INCREF(value);
    }
    PyObject *t = Py_BuildValue("(iN)", tag, value);
    return t;
}

/* Decrypt what bio_in holds: the plaintext (maybe b""), *closed set at close_notify;
 * NULL with *tls_error set to a TLS failure, or NULL with an exception (a bug). */
static PyObject *
decrypt(const tls_names_t *names, PyObject *sslobj, PyObject *bio_in, int *closed, PyObject **tls_error)
{
    PyObject *chunks = NULL, *first = NULL;
    PyObject *size = PyLong_FromLong(MAX_SIZE);
    if (size == NULL) {
        return NULL;
    }
    for (;;) {
        Py_ssize_t left = pending_of(names, bio_in, 0);
        Py_ssize_t held = left == 0 ? pending_of(names, sslobj, 1) : 0;
        if (left < 0 || held < 0) {
            goto fail;
        }
        if (left == 0 && held == 0) {
            break;
        }
        PyObject *chunk = PyObject_CallMethodOneArg(sslobj, names->s_read, size);
        if (chunk == NULL) {
            if (PyErr_ExceptionMatches(names->want_read)) {
                PyErr_Clear(); /* a partial record: the rest comes with the next read */
                break;
            }
            if (PyErr_ExceptionMatches(names->zero_return)) {
                PyErr_Clear();
                *closed = 1;
                break;
            }
            if (PyErr_ExceptionMatches(PyExc_OSError)) { /* SSLError is an OSError */
                *tls_error = take_exception();
            }
            goto fail;
        }
        if (PyBytes_GET_SIZE(chunk) == 0) { /* _ssl's read gives b"" at close_notify */
            Py_DECREF(chunk);
            *closed = 1;
            break;
        }
        if (first == NULL) {
            first = chunk;
            continue;
        }
        if (chunks == NULL && (chunks = PyList_New(0)) == NULL) {
            Py_DECREF(chunk);
            goto fail;
        }
        int bad = PyList_Append(chunks, chunk);
        Py_DECREF(chunk);
        if (bad < 0) {
            goto fail;
        }
    }
    Py_DECREF(size);
    if (first == NULL) {
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    if (chunks == NULL) {
        return first;
    }
    if (PyList_Insert(chunks, 0, first) < 0) {
        Py_DECREF(first);
        Py_DECREF(chunks);
        return NULL;
    }
    Py_DECREF(first);
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    PyObject *joined = empty == NULL ? NULL : PyObject_CallMethod(empty, "join", "O", chunks);
    Py_XDECREF(empty);
    Py_DECREF(chunks);
    return joined;
fail:
    Py_DECREF(size);
    Py_XDECREF(first);
    Py_XDECREF(chunks);
    return NULL;
}

/* Send what bio_out holds: DONE, PARTIAL (*rest: what did not go), ERRNO, or -1. */
static int
flush_out(const tls_names_t *names, int fd, PyObject *bio_out, PyObject **rest)
{
    Py_ssize_t n = pending_of(names, bio_out, 0);
    if (n <= 0) {
        return n < 0 ? -1 : OUT_DONE;
    }
    PyObject *data = PyObject_CallMethodNoArgs(bio_out, names->s_read);
    if (data == NULL) {
        return -1;
    }
    if (!PyBytes_Check(data)) {
        Py_DECREF(data);
        PyErr_SetString(PyExc_TypeError, "tls_serve: bio_out.read() did not give bytes");
        return -1;
    }
    ssize_t sent;
    do {
        sent = send(fd, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
                    MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        Py_DECREF(data);
        *rest = PyLong_FromLong(errno);
        return *rest == NULL ? -1 : OUT_ERRNO;
    }
    if (sent == PyBytes_GET_SIZE(data)) {
        Py_DECREF(data);
        return OUT_DONE;
    }
    if (sent <= 0) {
        *rest = data;
    } else {
        *rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + sent,
                                          PyBytes_GET_SIZE(data) - sent);
        Py_DECREF(data);
    }
    return *rest == NULL ? -1 : OUT_PARTIAL;
}

HIDDEN PyObject *
tls_serve(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    state_t *st = get_state(module);
    int fd;
    if (fd_args(args, nargs, 8,
                "tls_serve(fd, sslobj, bio_in, bio_out, member, handler, ctx, max_message)",
                &fd) < 0) {
        return NULL;
    }
    long long max;
    if (int_arg(args[7], 0, PY_SSIZE_T_MAX, "tls_serve: max_message", PyExc_ValueError, &max) <
            0 ||
        tls_init(st) < 0) {
        return NULL;
    }
    const tls_names_t *names = &st->tls;
    PyObject *sslobj = args[1], *bio_in = args[2], *bio_out = args[3], *member = args[4];
    ssize_t got;
    do {
        got = recv(fd, st->stream_buf, MAX_SIZE, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return outcome(OUT_DONE, NULL);
        }
        return outcome(OUT_ERRNO, PyLong_FromLong(errno));
    }
    if (got == 0) {
        return outcome(OUT_EOF, NULL);
    }
    /* The ciphertext goes straight from the shared buffer into the BIO (a C copy). */
    PyObject *view = PyMemoryView_FromMemory(st->stream_buf, got, PyBUF_READ);
    if (view == NULL) {
        return NULL;
    }
    PyObject *wrote = PyObject_CallMethodOneArg(bio_in, names->s_write, view);
    Py_DECREF(view);
    if (wrote == NULL) {
        return NULL;
    }
    Py_DECREF(wrote);
    int closed = 0;
    PyObject *tls_error = NULL;
    PyObject *data = decrypt(names, sslobj, bio_in, &closed, &tls_error);
    if (data == NULL) {
        return tls_error != NULL ? outcome(OUT_TLS_ERROR, tls_error) : NULL;
    }
    PyObject *rest = NULL;
    int tag;
    if (closed || PyBytes_GET_SIZE(data) == 0) {
        if (closed) {
            return outcome(OUT_TLS_CLOSED, data);
        }
        Py_DECREF(data);
        tag = flush_out(names, fd, bio_out, &rest); /* a post-handshake message's answer */
        return tag < 0 ? NULL : outcome(tag, rest);
    }
    if (PyBytes_GET_SIZE(data) > max) {
        return outcome(OUT_DATA, data);
    }
    if (PyObject_SetAttr(member, st->str_active, Py_True) < 0) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *call_args[2] = {data, args[6]};
    PyObject *reply = PyObject_Vectorcall(args[5], call_args, 2, NULL);
    Py_DECREF(data);
    if (reply == NULL) {
        PyObject *exc = take_exception();
        if (exc == NULL) {
            PyErr_SetString(PyExc_SystemError, "tls_serve: a handler failed without an exception");
            return NULL;
        }
        return outcome(OUT_RAISED, exc);
    }
    if (reply == Py_None) { /* no reply; what the TLS layer wrote itself still goes */
        Py_DECREF(reply);
        tag = flush_out(names, fd, bio_out, &rest);
        return tag < 0 ? NULL : outcome(tag, rest);
    }
    /* The handler ran Python code: write here only if the connection is still at fd. */
    PyObject *now = PyObject_GetAttr(member, names->s_fd);
    long at = now == NULL ? -1 : PyLong_AsLong(now);
    Py_XDECREF(now);
    if (at == -1 && PyErr_Occurred()) {
        Py_DECREF(reply);
        return NULL;
    }
    if (!PyBytes_CheckExact(reply) || at != fd) {
        return outcome(OUT_REPLY, reply);
    }
    PyObject *n = PyObject_CallMethodOneArg(sslobj, names->s_write, reply);
    Py_DECREF(reply);
    if (n == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_OSError)) {
            return NULL;
        }
        return outcome(OUT_TLS_ERROR, take_exception());
    }
    Py_DECREF(n);
    tag = flush_out(names, fd, bio_out, &rest);
    return tag < 0 ? NULL : outcome(tag, rest);
}
