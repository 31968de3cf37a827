/* sockserve._speedups: send_batch, a batch of datagrams per sendmmsg(2), and the
 * parsing of their destinations (the last host str parsed cached). */
#include "speedups.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

/* Fill *name from a Python address; returns its length, or 0 with an exception set.
 * The checks run in the order the contract gives (fastio.py), as the twin's do. */
static socklen_t
parse_address(state_t *st, PyObject *addr, struct sockaddr_storage *name)
{
    if (!PyTuple_Check(addr) || (PyTuple_GET_SIZE(addr) != 2 && PyTuple_GET_SIZE(addr) != 4)) {
        PyErr_SetString(PyExc_TypeError,
                        "send_batch: an address is (host, port) or (host, port, flowinfo, scope_id)");
        return 0;
    }
    Py_ssize_t parts = PyTuple_GET_SIZE(addr);
    for (Py_ssize_t i = 1; i < parts; i++) {
        if (!PyLong_Check(PyTuple_GET_ITEM(addr, i))) {
            PyErr_Format(PyExc_TypeError, "send_batch: %R has a part that is not an int", addr);
            return 0;
        }
    }
    PyObject *host = PyTuple_GET_ITEM(addr, 0);
    /* Exactly str: releasing a cached subclass instance could run its __del__, that
     * is Python code, in the middle of a batch. */
    if (!PyUnicode_CheckExact(host)) {
        PyErr_SetString(PyExc_TypeError, "send_batch: the host must be a str");
        return 0;
    }
    long long port, flowinfo = 0, scope_id = 0;
    if (int_arg(PyTuple_GET_ITEM(addr, 1), 0, 65535, "send_batch: port", PyExc_OverflowError,
                &port) < 0) {
        return 0;
    }
    if (parts == 4 &&
        (int_arg(PyTuple_GET_ITEM(addr, 2), 0, MAX_FLOWINFO, "send_batch: flowinfo",
                 PyExc_OverflowError, &flowinfo) < 0 ||
         int_arg(PyTuple_GET_ITEM(addr, 3), 0, UINT32_MAX, "send_batch: scope_id",
                 PyExc_OverflowError, &scope_id) < 0)) {
        return 0;
    }
    int family = parts == 2 ? AF_INET : AF_INET6;
    if (host != st->send_host_obj || family != st->send_host_family) {
        Py_ssize_t text_len;
        const char *text = PyUnicode_AsUTF8AndSize(host, &text_len);
        if (text == NULL) {
            return 0;
        }
        /* Numeric hosts only, as recv_batch gives them. An IPv6 host may carry a
         * non-empty "%zone", which is dropped: the scope id travels in the tuple. */
        char numeric[INET6_ADDRSTRLEN];
        Py_ssize_t keep = 0;
        while (keep < text_len && text[keep] != '%' && text[keep] != '\0') {
            keep++;
        }
        int zoned = keep < text_len && text[keep] == '%';
        int ok = (keep == text_len || (zoned && family == AF_INET6 && keep + 1 < text_len &&
                                       strlen(text + keep) == (size_t)(text_len - keep))) &&
                 keep < (Py_ssize_t)sizeof numeric;
        if (ok) {
            memcpy(numeric, text, (size_t)keep);
            numeric[keep] = '\0';
            ok = inet_pton(family, numeric, &st->send_host_addr) == 1;
        }
        if (!ok) {
            Py_CLEAR(st->send_host_obj);
            PyErr_Format(PyExc_ValueError, "send_batch: %R is not a numeric %s address", host,
                         family == AF_INET ? "IPv4" : "IPv6");
            return 0;
        }
        Py_XSETREF(st->send_host_obj, Py_NewRef(host));
        st->send_host_family = family;
    }
    memset(name, 0, sizeof *name);
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)name;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        sin->sin_addr = st->send_host_addr.v4;
        return sizeof *sin;
    }
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)name;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    sin6->sin6_flowinfo = htonl((uint32_t)flowinfo);
    sin6->sin6_scope_id = (uint32_t)scope_id;
    sin6->sin6_addr = st->send_host_addr.v6;
    return sizeof *sin6;
}

/* Append (index, errno) to *failed, creating the list on first use. */
static int
note_failure(PyObject **failed, Py_ssize_t index, int err)
{
    if (*failed == NULL && (*failed = PyList_New(0)) == NULL) {
        return -1;
    }
    PyObject *item = Py_BuildValue("(ni)", index, err);
    if (item == NULL) {
        return -1;
    }
    int rc = PyList_Append(*failed, item);
    Py_DECREF(item);
    return rc;
}

/* send_batch(fd, items) -> None | list[(index, errno)]
 *
 * items: a list of (bytes, address). Every datagram is tried; those the kernel
 * refused come back as (index, errno), so one bad destination costs only its own
 * reply. Once the socket buffer is full (EAGAIN) the rest are reported unsent. */
HIDDEN PyObject *
send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    state_t *st = get_state(module);
    int fd;
    if (fd_args(args, nargs, 2, "send_batch(fd, items)", &fd) < 0) {
        return NULL;
    }
    PyObject *items = args[1];
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "send_batch: items must be a list");
        return NULL;
    }
    if (require_udp(fd, "send_batch") < 0) {
        return NULL;
    }
    PyObject *failed = NULL;
    /* Failures of one chunk, noted in C first: making Python objects can run Python
     * code, and the shared arrays are in use until the chunk is sent. */
    struct {
        Py_ssize_t index;
        int err;
    } *fails = NULL;
    /* Between chunks, noting failures allocates (so may run Python code): the list's
     * length is read again for each chunk. */
    for (Py_ssize_t start = 0; start < PyList_GET_SIZE(items); start += MAX_BATCH) {
        Py_ssize_t total = PyList_GET_SIZE(items);
        Py_ssize_t n = total - start < MAX_BATCH ? total - start : MAX_BATCH;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PyList_GET_ITEM(items, start + i);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
                !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
                Py_XDECREF(failed);
                PyMem_Free(fails);
                return PyErr_Format(PyExc_TypeError,
                                    "send_batch: item %zd is not a (bytes, address) pair",
                                    start + i);
            }
            socklen_t len = parse_address(st, PyTuple_GET_ITEM(item, 1), &st->send_names[i]);
            if (len == 0) {
                Py_XDECREF(failed);
                PyMem_Free(fails);
                return NULL;
            }
            /* The list holds the bytes, and nothing runs Python code before the call. */
            PyObject *data = PyTuple_GET_ITEM(item, 0);
            st->send_iov[i].iov_base = PyBytes_AS_STRING(data);
            st->send_iov[i].iov_len = (size_t)PyBytes_GET_SIZE(data);
            struct msghdr *hdr = &st->send_msgs[i].msg_hdr;
            hdr->msg_name = &st->send_names[i];
            hdr->msg_namelen = len;
            hdr->msg_iov = &st->send_iov[i];
            hdr->msg_iovlen = 1;
            hdr->msg_control = NULL;
            hdr->msg_controllen = 0;
            hdr->msg_flags = 0;
        }
        int nfails = 0, full = 0;
        Py_ssize_t off = 0;
        while (off < n) {
            int sent = sendmmsg(fd, st->send_msgs + off, (unsigned int)(n - off), MSG_DONTWAIT);
            if (sent > 0) {
                off += sent;
                continue;
            }
            int err = sent < 0 ? errno : EIO;
            if (err == EINTR) {
                continue;
            }
            if (err == EAGAIN || err == EWOULDBLOCK) {
                full = err;
                break;
            }
            /* The first datagram of the rest failed on its own (say EMSGSIZE, or an
             * unreachable destination): note it and go on with the next. */
            if (fails == NULL && (fails = PyMem_Malloc(MAX_BATCH * sizeof *fails)) == NULL) {
                Py_XDECREF(failed);
                return PyErr_NoMemory();
            }
            fails[nfails].index = start + off;
            fails[nfails++].err = err;
            off += 1;
        }
        for (int i = 0; i < nfails; i++) {
            if (note_failure(&failed, fails[i].index, fails[i].err) < 0) {
                Py_XDECREF(failed);
                PyMem_Free(fails);
                return NULL;
            }
        }
        if (full) {
            /* The socket buffer is full: the rest is unsent. */
            for (Py_ssize_t i = start + off; i < total; i++) {
                if (note_failure(&failed, i, full) < 0) {
                    Py_XDECREF(failed);
                    PyMem_Free(fails);
                    return NULL;
                }
            }
            PyMem_Free(fails);
            return failed;
        }
    }
    PyMem_Free(fails);
    if (failed == NULL) {
        Py_RETURN_NONE;
    }
    return failed;
}
