/* sockserve._speedups: recv, recv_into and send, one non-blocking call each on a
 * stream socket. */
#include "speedups.h"

#include <errno.h>

/* recv(fd, size) -> bytes: one non-blocking recv; b"" at end of stream. */
HIDDEN PyObject *
stream_recv(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    state_t *st = get_state(module);
    int fd;
    if (fd_args(args, nargs, 2, "recv(fd, size)", &fd) < 0) {
        return NULL;
    }
    long long size;
    if (int_arg(args[1], 1, MAX_SIZE, "recv: size", PyExc_ValueError, &size) < 0) {
        return NULL;
    }
    ssize_t got;
    do {
        got = recv(fd, st->stream_buf, (size_t)size, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize(st->stream_buf, got);
}

/* recv_into(fd, buffer) -> int: one non-blocking recv into a writable buffer. */
HIDDEN PyObject *
stream_recv_into(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (fd_args(args, nargs, 2, "recv_into(fd, buffer)", &fd) < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (view.len == 0) {
        /* 0 means end of stream; and on a datagram socket a zero-length read would
         * consume (discard) a whole datagram. */
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "recv_into: the buffer is empty");
        return NULL;
    }
    ssize_t got;
    do {
        got = recv(fd, view.buf, (size_t)view.len, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    int err = errno;
    PyBuffer_Release(&view);
    if (got < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(got);
}

/* send(fd, data) -> int: one non-blocking send of bytes; how many went. */
HIDDEN PyObject *
stream_send(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (fd_args(args, nargs, 2, "send(fd, data)", &fd) < 0) {
        return NULL;
    }
    if (!PyBytes_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "send: data must be bytes, not %.100s",
                     Py_TYPE(args[1])->tp_name);
        return NULL;
    }
    ssize_t sent;
    do {
        sent = send(fd, PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1]),
                    MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(sent);
}
