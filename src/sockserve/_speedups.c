/* sockserve._speedups: socket I/O for the hot paths of the server and the load
 * generator, without the standard socket module's per-call costs. Optional:
 * sockserve.fastio falls back to pure Python when it is missing (or when
 * SOCKSERVE_PURE_PYTHON=1 is set).
 *
 * Why C: on loopback a request is mostly system calls, so what remains to cut is
 * the work around them.
 * - Datagrams: recv_batch/send_batch move a whole batch per recvmmsg(2)/sendmmsg(2)
 *   call. The standard library has no wrapper, and driving them from ctypes costs
 *   more Python per datagram than the calls save.
 * - Streams: recv/send are one non-blocking call each, like socket.recv/send, but
 *   without releasing the GIL around a call that cannot block, without parsing
 *   arguments by format string, and reading into a static buffer instead of
 *   allocating 64 KiB per read and shrinking it.
 * This module only copies between kernel structures and Python objects; every
 * decision (guards, handlers, what a failure means) stays in Python.
 *
 * Addresses are the Python objects socket.recvfrom gives and sendto takes:
 * (host, port) for AF_INET and (host, port, flowinfo, scope_id) for AF_INET6.
 * Other families are refused; callers use the recvfrom/sendto loop for them.
 *
 * The GIL is held throughout (no call blocks: MSG_DONTWAIT). The module-level
 * buffers below are still only used between a system call and the copy of its
 * results into objects that cannot run Python code (bytes): any other allocation
 * may start a garbage collection whose finalizers let another thread in.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

/* Datagrams per call at most (UIO_MAXIOV allows 1024; past 256 batches stop paying). */
#define MAX_BATCH 256
/* Largest datagram a caller may ask to receive (the IPv4/IPv6 UDP payload limit, rounded). */
#define MAX_SIZE 65536

static struct mmsghdr recv_msgs[MAX_BATCH];
static struct iovec recv_iov[MAX_BATCH];
static struct sockaddr_storage recv_names[MAX_BATCH];
static char *recv_arena;
static size_t recv_arena_size;

static struct mmsghdr send_msgs[MAX_BATCH];
static struct iovec send_iov[MAX_BATCH];
static struct sockaddr_storage send_names[MAX_BATCH];

/* The last IPv4 source seen and its host string: most traffic comes from few hosts,
 * and reusing the str saves an inet_ntop and an allocation per datagram. */
static struct in_addr last_v4_addr;
static PyObject *last_v4_host;
/* The last host str sent to and its parsed form, for the same reason (held, so that
 * a new str at a recycled address can never be mistaken for it). */
static PyObject *send_host_obj;
static int send_host_family;
static union {
    struct in_addr v4;
    struct in6_addr v6;
} send_host_addr;

/* An fd argument: any C int (PyLong_AsInt is public only from 3.13). A negative one
 * reaches the system call and fails there with EBADF, as on a closed socket. */
static int
as_fd(PyObject *obj, int *fd)
{
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < INT_MIN || value > INT_MAX) {
        PyErr_Format(PyExc_OverflowError, "fd %ld is out of range", value);
        return -1;
    }
    *fd = (int)value;
    return 0;
}

/* The common start of every function here: the argument count, then args[0] as an fd. */
static int
fd_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *signature,
        int *fd)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, not %zd", signature, want, nargs);
        return -1;
    }
    return as_fd(args[0], fd);
}

/* An int argument that must lie in lo..hi; "what" names it in the error. */
static int
int_in(PyObject *obj, Py_ssize_t lo, Py_ssize_t hi, const char *what, Py_ssize_t *out)
{
    Py_ssize_t value = PyLong_AsSsize_t(obj);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < lo || value > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd..%zd, not %zd", what, lo, hi, value);
        return -1;
    }
    *out = value;
    return 0;
}

static PyObject *
v4_host(const struct in_addr *addr)
{
    char text[INET_ADDRSTRLEN];
    if (last_v4_host != NULL && last_v4_addr.s_addr == addr->s_addr) {
        Py_INCREF(last_v4_host);
        return last_v4_host;
    }
    if (inet_ntop(AF_INET, addr, text, sizeof text) == NULL) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *host = PyUnicode_FromString(text);
    if (host == NULL) {
        return NULL;
    }
    Py_XSETREF(last_v4_host, Py_NewRef(host));
    last_v4_addr = *addr;
    return host;
}

static PyObject *
make_address(const struct sockaddr *name, socklen_t len)
{
    if (name->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)name;
        PyObject *host = v4_host(&sin->sin_addr);
        if (host == NULL) {
            return NULL;
        }
        return Py_BuildValue("(Ni)", host, (int)ntohs(sin->sin_port));
    }
    if (name->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)name;
        char text[NI_MAXHOST];
        /* Like the socket module: getnameinfo, so a scoped (link-local) address
         * reads "fe80::1%eth0". */
        int rc = getnameinfo(name, sizeof *sin6, text, sizeof text, NULL, 0, NI_NUMERICHOST);
        if (rc != 0) {
            PyErr_Format(PyExc_OSError, "recv_batch: getnameinfo: %s", gai_strerror(rc));
            return NULL;
        }
        return Py_BuildValue("(siII)", text, (int)ntohs(sin6->sin6_port),
                             (unsigned int)ntohl(sin6->sin6_flowinfo),
                             (unsigned int)sin6->sin6_scope_id);
    }
    PyErr_Format(PyExc_ValueError, "recv_batch: address family %d is not supported",
                 (int)name->sa_family);
    return NULL;
}

/* recv_batch(fd, count, size) -> list[(bytes, address)] */
static PyObject *
recv_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (fd_args(args, nargs, 3, "recv_batch(fd, count, size)", &fd) < 0) {
        return NULL;
    }
    Py_ssize_t count, size;
    if (int_in(args[1], 1, MAX_BATCH, "recv_batch: count", &count) < 0 ||
        int_in(args[2], 1, MAX_SIZE, "recv_batch: size", &size) < 0) {
        return NULL;
    }
    size_t need = (size_t)count * (size_t)size;
    if (need > recv_arena_size) {
        /* Grows to at most MAX_BATCH * MAX_SIZE; the kernel touches only the pages
         * datagrams land in, so small datagrams keep the resident part small. */
        char *arena = realloc(recv_arena, need);
        if (arena == NULL) {
            return PyErr_NoMemory();
        }
        recv_arena = arena;
        recv_arena_size = need;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        recv_iov[i].iov_base = recv_arena + i * size;
        recv_iov[i].iov_len = (size_t)size;
        struct msghdr *hdr = &recv_msgs[i].msg_hdr;
        hdr->msg_name = &recv_names[i];
        hdr->msg_namelen = sizeof recv_names[i];
        hdr->msg_iov = &recv_iov[i];
        hdr->msg_iovlen = 1;
        hdr->msg_control = NULL;
        hdr->msg_controllen = 0;
        hdr->msg_flags = 0;
    }
    int got;
    do {
        got = recvmmsg(fd, recv_msgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        return PyErr_SetFromErrno(PyExc_OSError); /* EAGAIN: BlockingIOError */
    }
    /* Copy out of the shared buffers before anything that can run Python code (a
     * GC-tracked allocation can start a collection, whose finalizers can let
     * another thread in to reuse them). Bytes objects are not GC-tracked. */
    PyObject *datas[MAX_BATCH];
    struct sockaddr_in6 names[MAX_BATCH]; /* large enough for AF_INET and AF_INET6 */
    socklen_t name_lens[MAX_BATCH];
    for (int i = 0; i < got; i++) {
        /* Like recvfrom(size): a datagram longer than size arrives cut to size. */
        datas[i] = PyBytes_FromStringAndSize(recv_iov[i].iov_base, recv_msgs[i].msg_len);
        if (datas[i] == NULL) {
            while (--i >= 0) {
                Py_DECREF(datas[i]);
            }
            return NULL;
        }
        socklen_t len = recv_msgs[i].msg_hdr.msg_namelen;
        memset(&names[i], 0, sizeof names[i]);
        memcpy(&names[i], &recv_names[i], len < sizeof names[i] ? len : sizeof names[i]);
        name_lens[i] = len;
    }
    PyObject *batch = PyList_New(got);
    for (int i = 0; i < got; i++) {
        PyObject *addr = batch == NULL ? NULL
                                       : make_address((struct sockaddr *)&names[i], name_lens[i]);
        PyObject *item = addr == NULL ? NULL : PyTuple_New(2);
        if (item == NULL) {
            Py_XDECREF(addr);
            Py_XDECREF(batch);
            for (int j = i; j < got; j++) {
                Py_DECREF(datas[j]);
            }
            return NULL;
        }
        PyTuple_SET_ITEM(item, 0, datas[i]);
        PyTuple_SET_ITEM(item, 1, addr);
        PyList_SET_ITEM(batch, i, item);
    }
    return batch;
}

/* Fill *name from a Python address; returns its length, or 0 with an exception set. */
static socklen_t
parse_address(PyObject *addr, struct sockaddr_storage *name)
{
    if (!PyTuple_Check(addr) || (PyTuple_GET_SIZE(addr) != 2 && PyTuple_GET_SIZE(addr) != 4)) {
        PyErr_SetString(PyExc_TypeError,
                        "send_batch: an address is (host, port) or (host, port, flowinfo, scope_id)");
        return 0;
    }
    /* ints only: an object with __index__ would run Python code mid-batch. */
    for (Py_ssize_t i = 1; i < PyTuple_GET_SIZE(addr); i++) {
        if (!PyLong_Check(PyTuple_GET_ITEM(addr, i))) {
            PyErr_Format(PyExc_TypeError, "send_batch: %R has a part that is not an int", addr);
            return 0;
        }
    }
    PyObject *host = PyTuple_GET_ITEM(addr, 0);
    long port = PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred()) {
        return 0;
    }
    if (port < 0 || port > 65535) {
        PyErr_Format(PyExc_OverflowError, "send_batch: port must be 0-65535, not %ld", port);
        return 0;
    }
    if (host != send_host_obj) {
        /* Exactly str: releasing a cached subclass instance could run its __del__,
         * that is Python code, in the middle of a batch (see send_batch). */
        if (!PyUnicode_CheckExact(host)) {
            PyErr_SetString(PyExc_TypeError, "send_batch: the host must be a str");
            return 0;
        }
        Py_ssize_t text_len;
        const char *text = PyUnicode_AsUTF8AndSize(host, &text_len);
        if (text == NULL) {
            return 0;
        }
        /* Numeric hosts only, as recv_batch gives them; an IPv6 "%zone" suffix is
         * dropped, since the scope id travels in the address tuple. */
        char numeric[INET6_ADDRSTRLEN];
        Py_ssize_t keep = 0;
        while (keep < text_len && text[keep] != '%' && text[keep] != '\0') {
            keep++;
        }
        int family = PyTuple_GET_SIZE(addr) == 2 ? AF_INET : AF_INET6;
        int ok = (keep == text_len || text[keep] == '%') && keep < (Py_ssize_t)sizeof numeric;
        if (ok) {
            memcpy(numeric, text, (size_t)keep);
            numeric[keep] = '\0';
            ok = inet_pton(family, numeric, &send_host_addr) == 1;
        }
        if (!ok) {
            Py_CLEAR(send_host_obj);
            PyErr_Format(PyExc_ValueError, "send_batch: %R is not a numeric %s address", host,
                         family == AF_INET ? "IPv4" : "IPv6");
            return 0;
        }
        Py_XSETREF(send_host_obj, Py_NewRef(host));
        send_host_family = family;
    }
    memset(name, 0, sizeof *name);
    if (send_host_family == AF_INET && PyTuple_GET_SIZE(addr) == 2) {
        struct sockaddr_in *sin = (struct sockaddr_in *)name;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        sin->sin_addr = send_host_addr.v4;
        return sizeof *sin;
    }
    if (send_host_family == AF_INET6 && PyTuple_GET_SIZE(addr) == 4) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)name;
        unsigned long flowinfo = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 2));
        if (flowinfo == (unsigned long)-1 && PyErr_Occurred()) {
            return 0;
        }
        unsigned long scope_id = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 3));
        if (scope_id == (unsigned long)-1 && PyErr_Occurred()) {
            return 0;
        }
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_flowinfo = htonl((uint32_t)flowinfo);
        sin6->sin6_scope_id = (uint32_t)scope_id;
        sin6->sin6_addr = send_host_addr.v6;
        return sizeof *sin6;
    }
    PyErr_Format(PyExc_ValueError, "send_batch: %R is not an address of its tuple's family", addr);
    return 0;
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
static PyObject *
send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (fd_args(args, nargs, 2, "send_batch(fd, items)", &fd) < 0) {
        return NULL;
    }
    PyObject *items = args[1];
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "send_batch: items must be a list");
        return NULL;
    }
    PyObject *failed = NULL;
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
                return PyErr_Format(PyExc_TypeError,
                                    "send_batch: item %zd is not a (bytes, address) pair",
                                    start + i);
            }
            socklen_t len = parse_address(PyTuple_GET_ITEM(item, 1), &send_names[i]);
            if (len == 0) {
                Py_XDECREF(failed);
                return NULL;
            }
            /* The list holds the bytes, and nothing runs Python code before the call. */
            PyObject *data = PyTuple_GET_ITEM(item, 0);
            send_iov[i].iov_base = PyBytes_AS_STRING(data);
            send_iov[i].iov_len = (size_t)PyBytes_GET_SIZE(data);
            struct msghdr *hdr = &send_msgs[i].msg_hdr;
            hdr->msg_name = &send_names[i];
            hdr->msg_namelen = len;
            hdr->msg_iov = &send_iov[i];
            hdr->msg_iovlen = 1;
            hdr->msg_control = NULL;
            hdr->msg_controllen = 0;
            hdr->msg_flags = 0;
        }
        /* Failures are noted in C first: making Python objects can run Python code
         * (see recv_batch), and the shared arrays are in use until the chunk is sent. */
        Py_ssize_t fail_index[MAX_BATCH];
        int fail_errno[MAX_BATCH];
        int fails = 0, full = 0;
        Py_ssize_t off = 0;
        while (off < n) {
            int sent = sendmmsg(fd, send_msgs + off, (unsigned int)(n - off), MSG_DONTWAIT);
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
            fail_index[fails] = start + off;
            fail_errno[fails++] = err;
            off += 1;
        }
        for (int i = 0; i < fails; i++) {
            if (note_failure(&failed, fail_index[i], fail_errno[i]) < 0) {
                Py_XDECREF(failed);
                return NULL;
            }
        }
        if (full) {
            /* The socket buffer is full: the rest is unsent. */
            for (Py_ssize_t i = start + off; i < total; i++) {
                if (note_failure(&failed, i, full) < 0) {
                    Py_XDECREF(failed);
                    return NULL;
                }
            }
            return failed;
        }
    }
    if (failed == NULL) {
        Py_RETURN_NONE;
    }
    return failed;
}

/* Stream reads land here and are copied out at their real size: a recv(65536) through
 * the socket module allocates 64 KiB per call and shrinks it, which on glibc also
 * triggers malloc_consolidate on busy servers. */
static char stream_buf[MAX_SIZE];

/* recv(fd, size) -> bytes: one non-blocking recv; b"" at end of stream. */
static PyObject *
stream_recv(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (fd_args(args, nargs, 2, "recv(fd, size)", &fd) < 0) {
        return NULL;
    }
    Py_ssize_t size;
    if (int_in(args[1], 1, MAX_SIZE, "recv: size", &size) < 0) {
        return NULL;
    }
    ssize_t got;
    do {
        got = recv(fd, stream_buf, (size_t)size, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize(stream_buf, got);
}

/* recv_into(fd, buffer) -> int: one non-blocking recv into a writable buffer. */
static PyObject *
stream_recv_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (fd_args(args, nargs, 2, "recv_into(fd, buffer)", &fd) < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) < 0) {
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
static PyObject *
stream_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
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

/* Events taken per poll_fast call at most (the hub's MAX_EVENTS). */
#define MAX_EVENTS 1024
static PyObject *str_active; /* "active", interned */
static PyObject *str_fd;     /* "fd", interned */

/* Whether the member still owns fd after Python code ran: a connection closed by
 * that code has fd -1, and the number may already belong to a new connection. */
static int
still_owns(PyObject *member, int fd)
{
    PyObject *now = PyObject_GetAttr(member, str_fd);
    if (now == NULL) {
        return -1;
    }
    long value = PyLong_AsLong(now);
    Py_DECREF(now);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    return value == fd;
}

/* Serve one readable fast connection: recv, call the handler, send the reply.
 * Returns NULL with no exception when the request was answered in full (or there
 * was nothing to read), a new reference to what the hub must finish in Python
 * otherwise (see poll_fast), or NULL with an exception to propagate. */
static PyObject *
serve_fast(int fd, PyObject *spec)
{
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
        PyErr_SetString(PyExc_TypeError, "poll_fast: a spec is (member, handler, ctx, max)");
        return NULL;
    }
    PyObject *member = PyTuple_GET_ITEM(spec, 0);
    PyObject *handler = PyTuple_GET_ITEM(spec, 1);
    PyObject *ctx = PyTuple_GET_ITEM(spec, 2);
    Py_ssize_t max = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 3));
    if (max == -1 && PyErr_Occurred()) {
        return NULL;
    }
    ssize_t got;
    do {
        got = recv(fd, stream_buf, sizeof stream_buf, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return NULL;
        }
        return PyLong_FromLong(errno);
    }
    PyObject *data = PyBytes_FromStringAndSize(stream_buf, got);
    if (data == NULL || got == 0 || got > max) {
        return data; /* end of stream, or longer than one request may be */
    }
    /* A whole request: mark the connection active for the idle sweeper, as the
     * Python hot path does, then answer it. */
    if (PyObject_SetAttr(member, str_active, Py_True) < 0) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *call_args[2] = {data, ctx};
    Py_INCREF(handler);
    PyObject *reply = PyObject_Vectorcall(handler, call_args, 2, NULL);
    Py_DECREF(handler);
    Py_DECREF(data);
    int raised = 0;
    if (reply == NULL) {
        /* Whatever the handler raised, SystemExit and KeyboardInterrupt included, goes
         * back for its connection: the hub logs it as the handler's failure, or raises
         * it again if it is a real Ctrl-C (sockserve.server.signals). */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (value == NULL) {
            Py_XDECREF(type);
            Py_XDECREF(tb);
            PyErr_SetString(PyExc_SystemError, "poll_fast: a handler failed without an exception");
            return NULL;
        }
        if (tb != NULL) {
            PyException_SetTraceback(value, tb);
        }
        Py_XDECREF(type);
        Py_XDECREF(tb);
        reply = value;
        raised = 1;
    }
    else if (reply == Py_None) {
        Py_DECREF(reply);
        return NULL;
    }
    /* The handler ran Python code: if that closed this connection, what it returned
     * belongs to nobody now (the Python path's send to fd -1 fails the same way). */
    int owns = still_owns(member, fd);
    if (owns != 1) {
        if (owns == 0 && raised && PyErr_GivenExceptionMatches(reply, PyExc_KeyboardInterrupt)) {
            /* No connection to hand it to, but a Ctrl-C must not be lost: it stops the
             * batch, and the hub decides whether it was a signal's. */
            PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(reply)), reply,
                          PyException_GetTraceback(reply));
            return NULL;
        }
        Py_DECREF(reply);
        return NULL; /* with the exception of still_owns set, if it failed */
    }
    if (raised) {
        return reply; /* an exception instance: raised, never returned (see below) */
    }
    /* Anything else, an exception object returned rather than raised too, is a reply:
     * (reply, 0) for the hub, which sends bytes-like ones and reports the rest. */
    Py_ssize_t sent = 0;
    if (PyBytes_CheckExact(reply)) {
        Py_ssize_t len = PyBytes_GET_SIZE(reply);
        ssize_t rc;
        do {
            rc = send(fd, PyBytes_AS_STRING(reply), (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (rc < 0 && errno == EINTR);
        if (rc == len) {
            Py_DECREF(reply);
            return NULL;
        }
        sent = rc >= 0 ? rc : -(Py_ssize_t)errno;
    }
    return Py_BuildValue("(Nn)", reply, sent);
}

/* poll_fast(epfd, maxevents, fast) -> (nevents, rest, error)
 *
 * One epoll_wait(epfd, timeout 0). Events of connections registered in ``fast``
 * (fd -> (member, handler, ctx, max): raw framing, a sync handler, nothing queued
 * to send) that are exactly EPOLLIN are served here: the Python hot path of
 * FastStream.on_event, without its interpreter overhead. Everything else comes
 * back in ``rest`` as (fd, events, extra) for the hub to finish in Python:
 * extra is None (not touched: call on_event), bytes (received but not answered:
 * end of stream or an oversized request), an int (recv's errno), an exception
 * instance (the handler raised it: any BaseException), or (reply, sent) (a reply
 * that is not bytes, an exception object returned included, or was not sent whole;
 * sent < 0 is -errno). ``error`` is None, or an exception that stopped the batch
 * (MemoryError, or a handler's KeyboardInterrupt after its code closed its own
 * connection): the caller finishes ``rest`` first, then raises it. */
static PyObject *
poll_fast(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int epfd;
    if (fd_args(args, nargs, 3, "poll_fast(epfd, maxevents, fast)", &epfd) < 0) {
        return NULL;
    }
    Py_ssize_t maxevents;
    if (int_in(args[1], 1, MAX_EVENTS, "poll_fast: maxevents", &maxevents) < 0) {
        return NULL;
    }
    PyObject *fast = args[2];
    if (!PyDict_Check(fast)) {
        PyErr_SetString(PyExc_TypeError, "poll_fast: fast must be a dict");
        return NULL;
    }
    /* On the stack: the handlers called below run Python code, which can let another
     * thread's hub call in. */
    struct epoll_event poll_events[MAX_EVENTS];
    int n = epoll_wait(epfd, poll_events, (int)maxevents, 0);
    if (n < 0) {
        if (errno != EINTR) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        n = 0;
    }
    PyObject *rest = PyList_New(0);
    if (rest == NULL) {
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        int fd = poll_events[i].data.fd;
        uint32_t ev = poll_events[i].events;
        PyObject *extra = NULL;
        if (ev == EPOLLIN) {
            PyObject *key = PyLong_FromLong(fd);
            if (key == NULL) {
                goto error;
            }
            PyObject *spec = PyDict_GetItemWithError(fast, key);
            Py_DECREF(key);
            if (spec == NULL && PyErr_Occurred()) {
                goto error;
            }
            if (spec != NULL) {
                Py_INCREF(spec); /* the handler may run code that unregisters it */
                extra = serve_fast(fd, spec);
                Py_DECREF(spec);
                if (extra == NULL) {
                    if (PyErr_Occurred()) {
                        goto error;
                    }
                    continue; /* answered */
                }
            }
        }
        PyObject *item = Py_BuildValue("(iIN)", fd, (unsigned int)ev,
                                       extra != NULL ? extra : Py_NewRef(Py_None));
        if (item == NULL || PyList_Append(rest, item) < 0) {
            Py_XDECREF(item);
            goto error;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(iNO)", n, rest, Py_None);
error:
    /* Stop here, but hand back what was already taken off sockets (data read,
     * replies half sent) with the error, which the hub raises once it is done. */
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (value == NULL) {
            Py_XDECREF(type);
            Py_XDECREF(tb);
            Py_DECREF(rest);
            PyErr_SetString(PyExc_SystemError, "poll_fast: error without an exception");
            return NULL;
        }
        if (tb != NULL) {
            PyException_SetTraceback(value, tb);
        }
        Py_XDECREF(type);
        Py_XDECREF(tb);
        return Py_BuildValue("(iNN)", n, rest, value);
    }
}

static PyMethodDef methods[] = {
    {"poll_fast", (PyCFunction)(void (*)(void))poll_fast, METH_FASTCALL,
     "poll_fast(epfd, maxevents, fast) -> (nevents, rest, error)\n\n"
     "One non-blocking epoll_wait; serves plain raw requests of the connections in fast\n"
     "and returns the events left for Python as (fd, events, extra)."},
    {"recv", (PyCFunction)(void (*)(void))stream_recv, METH_FASTCALL,
     "recv(fd, size) -> bytes\n\nOne non-blocking recv(2) without releasing the GIL."},
    {"recv_into", (PyCFunction)(void (*)(void))stream_recv_into, METH_FASTCALL,
     "recv_into(fd, buffer) -> int\n\nOne non-blocking recv(2) into buffer, without releasing the GIL."},
    {"send", (PyCFunction)(void (*)(void))stream_send, METH_FASTCALL,
     "send(fd, data) -> int\n\nOne non-blocking send(2) without releasing the GIL."},
    {"recv_batch", (PyCFunction)(void (*)(void))recv_batch, METH_FASTCALL,
     "recv_batch(fd, count, size) -> list[tuple[bytes, address]]\n\n"
     "Receive up to count datagrams (each cut to size bytes) with one recvmmsg call,\n"
     "without blocking; raises BlockingIOError when none is waiting."},
    {"send_batch", (PyCFunction)(void (*)(void))send_batch, METH_FASTCALL,
     "send_batch(fd, items) -> None | list[tuple[int, int]]\n\n"
     "Send each (bytes, address) of items with sendmmsg, without blocking. Returns None\n"
     "when all were sent, else (index, errno) for each that was not."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sockserve._speedups",
    .m_doc = "Socket I/O for sockserve's hot paths: recvmmsg/sendmmsg batches, recv/send (Linux).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    str_active = PyUnicode_InternFromString("active");
    str_fd = PyUnicode_InternFromString("fd");
    if (str_active == NULL || str_fd == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "MAX_BATCH", MAX_BATCH) < 0 ||
        PyModule_AddIntConstant(module, "MAX_SIZE", MAX_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "MAX_EVENTS", MAX_EVENTS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
