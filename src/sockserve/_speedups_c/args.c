/* sockserve._speedups: the argument checks every entry point shares (the contract's
 * "Arguments" in fastio.py), run before any system call. */
#include "speedups.h"

#include <limits.h>

/* An int argument (int or a subclass: no __index__) that must lie in lo..hi;
 * "what" names it in the error: TypeError if not an int, else `range` (ValueError or
 * OverflowError) if out of range. */
HIDDEN int
int_arg(PyObject *obj, long long lo, long long hi, const char *what, PyObject *range,
        long long *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || value < lo || value > hi) {
        PyErr_Format(range, "%s must be %lld..%lld, not %R", what, lo, hi, obj);
        return -1;
    }
    *out = value;
    return 0;
}

/* The common start of every function here: the argument count, then args[0] as an fd
 * (any C int: a negative one fails in the system call with EBADF, as a closed socket). */
HIDDEN int
fd_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *signature,
        int *fd)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, not %zd", signature, want, nargs);
        return -1;
    }
    long long value;
    if (int_arg(args[0], INT_MIN, INT_MAX, "fd", PyExc_OverflowError, &value) < 0) {
        return -1;
    }
    *fd = (int)value;
    return 0;
}

/* recv_batch and send_batch serve UDP sockets only: anything else is refused before
 * any I/O (recvmmsg on a stream socket would read its data, then fail on its address). */
HIDDEN int
require_udp(int fd, const char *who)
{
    int proto = 0;
    socklen_t len = sizeof proto;
    if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (proto != IPPROTO_UDP && proto != IPPROTO_UDPLITE) {
        PyErr_Format(PyExc_ValueError, "%s: fd %d is not a UDP socket", who, fd);
        return -1;
    }
    return 0;
}
