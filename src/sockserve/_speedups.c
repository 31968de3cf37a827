/* sockserve._speedups: socket I/O for the hot paths of the server and the load
 * generator, without the standard socket module's per-call costs. Optional:
 * sockserve._engine.fastio falls back to pure Python when it is missing (or when
 * SOCKSERVE_PURE_PYTHON=1 is set).
 *
 * THE CONTRACT every function here keeps, and its pure-Python twin with it, is
 * written once, in the docstring of src/sockserve/_engine/fastio.py; the twins live
 * there and in _engine/fastpath.py, and tests/unit/test_fastpath_fuzz.py runs both on
 * the same hostile arguments. Change one side only together with the other.
 *
 * Why C: on loopback a request is mostly system calls, so what remains to cut is
 * the work around them.
 * - Datagrams: recv_batch/send_batch move a whole batch per recvmmsg(2)/sendmmsg(2)
 *   call. The standard library has no wrapper, and driving them from ctypes costs
 *   more Python per datagram than the calls save.
 * - Streams: recv/send are one non-blocking call each, like socket.recv/send, but
 *   without releasing the GIL around a call that cannot block, without parsing
 *   arguments by format string, and reading into one buffer instead of allocating
 *   64 KiB per read and shrinking it.
 * - poll_fast: one epoll_wait, and the plain raw requests it finds answered here.
 *
 * Arguments are ints (int or a subclass), never objects with __index__: converting
 * those runs Python code, in the middle of a batch.
 *
 * Memory: the buffers shared between calls live in the module state and are only
 * used between a system call and the copy of its results into objects whose
 * creation cannot run Python code (bytes). Anything that can (a GC-tracked
 * allocation may start a collection, whose finalizers may call in again) works on
 * per-call heap copies. Nothing large lives on the C stack, so deep recursion
 * (a handler that calls poll_fast again) ends in RecursionError, not a crash.
 * The GIL is held throughout (every call is MSG_DONTWAIT): the module declares
 * Py_MOD_GIL_USED, since its shared buffers are not safe without it.
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
/* Largest read a caller may ask for (the IPv4/IPv6 UDP payload limit, rounded). */
#define MAX_SIZE 65536
/* Events taken per poll_fast call at most (the hub's MAX_EVENTS). */
#define MAX_EVENTS 1024
/* Largest IPv6 flow label (20 bits), as the socket module enforces it. */
#define MAX_FLOWINFO 0xFFFFFUL

/* Outcome tags of poll_fast's items (fastio.py documents each). */
enum {
    OUT_DONE = 0,
    OUT_EVENT = 1,
    OUT_DATA = 2,
    OUT_EOF = 3,
    OUT_ERRNO = 4,
    OUT_RAISED = 5,
    OUT_REPLY = 6,
    OUT_PARTIAL = 7,
};
/* Framing kinds a spec may name; only raw is served here so far. */
enum { KIND_RAW = 0 };

typedef struct {
    /* recv_batch / send_batch kernel structures (see Memory above). */
    struct mmsghdr *recv_msgs;
    struct iovec *recv_iov;
    struct sockaddr_storage *recv_names;
    char *recv_arena;
    size_t recv_arena_size;
    struct mmsghdr *send_msgs;
    struct iovec *send_iov;
    struct sockaddr_storage *send_names;
    /* Stream reads land here and are copied out at their real size: a recv(65536)
     * through the socket module allocates 64 KiB per call and shrinks it, which on
     * glibc also triggers malloc_consolidate on busy servers. */
    char *stream_buf;
    /* The last IPv4 source seen and its host str: most traffic comes from few hosts,
     * and reusing the str saves an inet_ntop and an allocation per datagram. */
    struct in_addr last_v4_addr;
    PyObject *last_v4_host;
    /* The last host str sent to and its parsed form, for the same reason (held, so
     * that a new str at a recycled address can never be mistaken for it). */
    PyObject *send_host_obj;
    int send_host_family;
    union {
        struct in_addr v4;
        struct in6_addr v6;
    } send_host_addr;
    PyObject *str_active; /* "active", interned: the one member attribute C writes */
    /* poll_fast's events, for the outermost call; a nested one (a handler that polls
     * again) takes its own from the heap. */
    struct epoll_event *events;
    int events_busy;
} state_t;

static inline state_t *
get_state(PyObject *module)
{
    return (state_t *)PyModule_GetState(module);
}

/* The exception being raised, taken (the 3.12+ API where there is one). */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* An int argument (int or a subclass: no __index__) that must lie in lo..hi;
 * "what" names it in the error: TypeError if not an int, else `range` (ValueError or
 * OverflowError) if out of range. */
static int
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
static int
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
static int
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

static PyObject *
v4_host(state_t *st, const struct in_addr *addr)
{
    char text[INET_ADDRSTRLEN];
    if (st->last_v4_host != NULL && st->last_v4_addr.s_addr == addr->s_addr) {
        return Py_NewRef(st->last_v4_host);
    }
    if (inet_ntop(AF_INET, addr, text, sizeof text) == NULL) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *host = PyUnicode_FromString(text);
    if (host == NULL) {
        return NULL;
    }
    Py_XSETREF(st->last_v4_host, Py_NewRef(host));
    st->last_v4_addr = *addr;
    return host;
}

static PyObject *
make_address(state_t *st, const struct sockaddr *name, socklen_t len)
{
    if (name->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)name;
        PyObject *host = v4_host(st, &sin->sin_addr);
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

/* What recv_batch copies out of the shared buffers per datagram before it makes
 * anything that can run Python code. */
typedef struct {
    PyObject *data;
    struct sockaddr_in6 name; /* large enough for AF_INET and AF_INET6 */
    socklen_t name_len;
} received_t;

/* recv_batch(fd, count, size) -> list[(bytes, address)] */
static PyObject *
recv_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    state_t *st = get_state(module);
    int fd;
    if (fd_args(args, nargs, 3, "recv_batch(fd, count, size)", &fd) < 0) {
        return NULL;
    }
    long long count, size;
    if (int_arg(args[1], 1, MAX_BATCH, "recv_batch: count", PyExc_ValueError, &count) < 0 ||
        int_arg(args[2], 1, MAX_SIZE, "recv_batch: size", PyExc_ValueError, &size) < 0 ||
        require_udp(fd, "recv_batch") < 0) {
        return NULL;
    }
    size_t need = (size_t)count * (size_t)size;
    if (need > st->recv_arena_size) {
        /* Grows to at most MAX_BATCH * MAX_SIZE; the kernel touches only the pages
         * datagrams land in, so small datagrams keep the resident part small. */
        char *arena = realloc(st->recv_arena, need);
        if (arena == NULL) {
            return PyErr_NoMemory();
        }
        st->recv_arena = arena;
        st->recv_arena_size = need;
    }
    received_t *got_items = PyMem_Malloc((size_t)count * sizeof *got_items);
    if (got_items == NULL) {
        return PyErr_NoMemory();
    }
    for (long long i = 0; i < count; i++) {
        st->recv_iov[i].iov_base = st->recv_arena + i * size;
        st->recv_iov[i].iov_len = (size_t)size;
        struct msghdr *hdr = &st->recv_msgs[i].msg_hdr;
        hdr->msg_name = &st->recv_names[i];
        hdr->msg_namelen = sizeof st->recv_names[i];
        hdr->msg_iov = &st->recv_iov[i];
        hdr->msg_iovlen = 1;
        hdr->msg_control = NULL;
        hdr->msg_controllen = 0;
        hdr->msg_flags = 0;
    }
    int got;
    do {
        got = recvmmsg(fd, st->recv_msgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        PyMem_Free(got_items);
        return PyErr_SetFromErrno(PyExc_OSError); /* EAGAIN: BlockingIOError */
    }
    /* Copy out of the shared buffers first (bytes objects are not GC-tracked). */
    for (int i = 0; i < got; i++) {
        /* Like recvfrom(size): a datagram longer than size arrives cut to size. */
        got_items[i].data =
            PyBytes_FromStringAndSize(st->recv_iov[i].iov_base, st->recv_msgs[i].msg_len);
        if (got_items[i].data == NULL) {
            while (--i >= 0) {
                Py_DECREF(got_items[i].data);
            }
            PyMem_Free(got_items);
            return NULL;
        }
        socklen_t len = st->recv_msgs[i].msg_hdr.msg_namelen;
        memset(&got_items[i].name, 0, sizeof got_items[i].name);
        memcpy(&got_items[i].name, &st->recv_names[i],
               len < sizeof got_items[i].name ? len : sizeof got_items[i].name);
        got_items[i].name_len = len;
    }
    PyObject *batch = PyList_New(got);
    for (int i = 0; i < got; i++) {
        PyObject *addr =
            batch == NULL
                ? NULL
                : make_address(st, (struct sockaddr *)&got_items[i].name, got_items[i].name_len);
        PyObject *item = addr == NULL ? NULL : PyTuple_New(2);
        if (item == NULL) {
            Py_XDECREF(addr);
            Py_XDECREF(batch);
            for (int j = i; j < got; j++) {
                Py_DECREF(got_items[j].data);
            }
            PyMem_Free(got_items);
            return NULL;
        }
        PyTuple_SET_ITEM(item, 0, got_items[i].data);
        PyTuple_SET_ITEM(item, 1, addr);
        PyList_SET_ITEM(batch, i, item);
    }
    PyMem_Free(got_items);
    return batch;
}

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
static PyObject *
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

/* recv(fd, size) -> bytes: one non-blocking recv; b"" at end of stream. */
static PyObject *
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

/* Check one spec, (member, handler, ctx, max_message, kind); 0 with *max set, or -1. */
static int
check_spec(PyObject *spec, Py_ssize_t *max)
{
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "poll_fast: a spec is (member, handler, ctx, max_message, kind)");
        return -1;
    }
    long long value, kind;
    if (int_arg(PyTuple_GET_ITEM(spec, 3), 0, PY_SSIZE_T_MAX, "poll_fast: max_message",
                PyExc_ValueError, &value) < 0 ||
        int_arg(PyTuple_GET_ITEM(spec, 4), KIND_RAW, KIND_RAW, "poll_fast: kind",
                PyExc_ValueError, &kind) < 0) {
        return -1;
    }
    *max = (Py_ssize_t)value;
    return 0;
}

/* Serve one readable fast connection (raw framing): recv, call the handler, send its
 * reply. Returns the outcome tag, with *value a new reference (NULL for OUT_DONE and
 * OUT_EOF), or -1 with an exception that stops the batch. */
static int
serve_fast(state_t *st, int fd, PyObject *key, PyObject *spec, PyObject *fast, PyObject **value)
{
    *value = NULL;
    Py_ssize_t max;
    if (check_spec(spec, &max) < 0) {
        return -1;
    }
    ssize_t got;
    do {
        got = recv(fd, st->stream_buf, MAX_SIZE, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return OUT_DONE; /* nothing to read after all */
        }
        *value = PyLong_FromLong(errno);
        return *value == NULL ? -1 : OUT_ERRNO;
    }
    if (got == 0) {
        return OUT_EOF;
    }
    PyObject *data = PyBytes_FromStringAndSize(st->stream_buf, got);
    if (data == NULL) {
        return -1;
    }
    if (got > max) {
        *value = data; /* longer than one request may be: Python splits it */
        return OUT_DATA;
    }
    /* A whole request: mark the connection active for the idle sweeper. */
    PyObject *member = PyTuple_GET_ITEM(spec, 0);
    if (PyObject_SetAttr(member, st->str_active, Py_True) < 0) {
        Py_DECREF(data);
        return -1;
    }
    PyObject *call_args[2] = {data, PyTuple_GET_ITEM(spec, 2)};
    PyObject *reply = PyObject_Vectorcall(PyTuple_GET_ITEM(spec, 1), call_args, 2, NULL);
    Py_DECREF(data);
    if (reply == NULL) {
        /* Whatever the handler raised, SystemExit and KeyboardInterrupt included, and
         * whether or not its code closed the connection, goes back for its member. */
        *value = take_exception();
        if (*value == NULL) {
            PyErr_SetString(PyExc_SystemError, "poll_fast: a handler failed without an exception");
            return -1;
        }
        return OUT_RAISED;
    }
    if (reply == Py_None) {
        Py_DECREF(reply);
        return OUT_DONE;
    }
    /* The handler ran Python code: send here only if this connection is still the
     * fast one at fd (not closed, its fd not reused, not writing); else Python does. */
    PyObject *now = PyDict_GetItemWithError(fast, key);
    if (now == NULL && PyErr_Occurred()) {
        Py_DECREF(reply);
        return -1;
    }
    if (now != spec || !PyBytes_CheckExact(reply)) {
        *value = reply; /* an exception object returned is a reply too */
        return OUT_REPLY;
    }
    Py_ssize_t len = PyBytes_GET_SIZE(reply);
    ssize_t rc;
    do {
        rc = send(fd, PyBytes_AS_STRING(reply), (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (rc < 0 && errno == EINTR);
    if (rc == len) {
        Py_DECREF(reply);
        return OUT_DONE;
    }
    if (rc < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        Py_DECREF(reply);
        *value = PyLong_FromLong(errno);
        return *value == NULL ? -1 : OUT_ERRNO;
    }
    if (rc <= 0) {
        *value = reply;
    }
    else {
        *value = PyBytes_FromStringAndSize(PyBytes_AS_STRING(reply) + rc, len - rc);
        Py_DECREF(reply);
        if (*value == NULL) {
            return -1;
        }
    }
    return OUT_PARTIAL;
}

/* Append (fd, tag, value, member) to rest; steals value. */
static int
add_item(PyObject *rest, int fd, int tag, PyObject *value, PyObject *member)
{
    PyObject *item = Py_BuildValue("(iiNO)", fd, tag, value != NULL ? value : Py_NewRef(Py_None),
                                   member);
    if (item == NULL) {
        return -1;
    }
    int rc = PyList_Append(rest, item);
    Py_DECREF(item);
    return rc;
}

static void
release_events(state_t *st, struct epoll_event *events, int nested)
{
    if (nested) {
        PyMem_Free(events);
    }
    else {
        st->events_busy = 0;
    }
}

/* poll_fast(epfd, maxevents, fast) -> (nevents, items, error): see fastio.py. */
static PyObject *
poll_fast(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    state_t *st = get_state(module);
    int epfd;
    if (fd_args(args, nargs, 3, "poll_fast(epfd, maxevents, fast)", &epfd) < 0) {
        return NULL;
    }
    long long maxevents;
    if (int_arg(args[1], 1, MAX_EVENTS, "poll_fast: maxevents", PyExc_ValueError, &maxevents) <
        0) {
        return NULL;
    }
    PyObject *fast = args[2];
    if (!PyDict_Check(fast)) {
        PyErr_SetString(PyExc_TypeError, "poll_fast: fast must be a dict");
        return NULL;
    }
    /* The handlers called below may call poll_fast again: only the outermost call
     * uses the state's buffer. */
    int nested = st->events_busy;
    struct epoll_event *events =
        nested ? PyMem_Malloc((size_t)maxevents * sizeof *events) : st->events;
    if (events == NULL) {
        return PyErr_NoMemory();
    }
    st->events_busy = 1;
    PyObject *rest = NULL;
    int n = epoll_wait(epfd, events, (int)maxevents, 0);
    if (n < 0) {
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto failed;
        }
        n = 0;
    }
    rest = PyList_New(0);
    if (rest == NULL) {
        goto failed;
    }
    for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        uint32_t ev = events[i].events;
        if (ev == EPOLLIN) {
            PyObject *key = PyLong_FromLong(fd);
            if (key == NULL) {
                goto error;
            }
            PyObject *spec = PyDict_GetItemWithError(fast, key);
            if (spec == NULL && PyErr_Occurred()) {
                Py_DECREF(key);
                goto error;
            }
            if (spec != NULL) {
                Py_INCREF(spec); /* the handler may run code that unregisters it */
                PyObject *value;
                int tag = serve_fast(st, fd, key, spec, fast, &value);
                Py_DECREF(key);
                int rc = tag <= OUT_DONE
                             ? tag
                             : add_item(rest, fd, tag, value, PyTuple_GET_ITEM(spec, 0));
                Py_DECREF(spec);
                if (rc < 0) {
                    goto error;
                }
                continue;
            }
            Py_DECREF(key);
        }
        if (add_item(rest, fd, OUT_EVENT, PyLong_FromUnsignedLong(ev), Py_None) < 0) {
            goto error;
        }
    }
    release_events(st, events, nested);
    return Py_BuildValue("(iNO)", n, rest, Py_None);
failed:
    release_events(st, events, nested);
    return NULL;
error:
    /* Stop here, but hand back what was already taken off sockets (data read,
     * replies half sent) with the error, which the hub raises once it is done. */
    release_events(st, events, nested);
    PyObject *exc = take_exception();
    if (exc == NULL) {
        Py_DECREF(rest);
        PyErr_SetString(PyExc_SystemError, "poll_fast: error without an exception");
        return NULL;
    }
    return Py_BuildValue("(iNN)", n, rest, exc);
}

static PyMethodDef methods[] = {
    {"poll_fast", (PyCFunction)(void (*)(void))poll_fast, METH_FASTCALL,
     "poll_fast(epfd, maxevents, fast) -> (nevents, items, error)\n\n"
     "One non-blocking epoll_wait; serves plain raw requests of the connections in fast\n"
     "and returns the rest as tagged (fd, tag, value, member) items (see fastio)."},
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

static int
module_exec(PyObject *module)
{
    state_t *st = get_state(module);
    st->recv_msgs = PyMem_Calloc(MAX_BATCH, sizeof *st->recv_msgs);
    st->recv_iov = PyMem_Calloc(MAX_BATCH, sizeof *st->recv_iov);
    st->recv_names = PyMem_Calloc(MAX_BATCH, sizeof *st->recv_names);
    st->send_msgs = PyMem_Calloc(MAX_BATCH, sizeof *st->send_msgs);
    st->send_iov = PyMem_Calloc(MAX_BATCH, sizeof *st->send_iov);
    st->send_names = PyMem_Calloc(MAX_BATCH, sizeof *st->send_names);
    st->stream_buf = PyMem_Malloc(MAX_SIZE);
    st->events = PyMem_Calloc(MAX_EVENTS, sizeof *st->events);
    if (st->events == NULL || st->recv_msgs == NULL || st->recv_iov == NULL || st->recv_names == NULL ||
        st->send_msgs == NULL || st->send_iov == NULL || st->send_names == NULL ||
        st->stream_buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    st->str_active = PyUnicode_InternFromString("active");
    if (st->str_active == NULL) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "MAX_BATCH", MAX_BATCH) < 0 ||
        PyModule_AddIntConstant(module, "MAX_SIZE", MAX_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "MAX_EVENTS", MAX_EVENTS) < 0) {
        return -1;
    }
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    state_t *st = get_state(module);
    if (st != NULL) {
        Py_VISIT(st->last_v4_host);
        Py_VISIT(st->send_host_obj);
    }
    return 0;
}

static int
module_clear(PyObject *module)
{
    state_t *st = get_state(module);
    if (st != NULL) {
        Py_CLEAR(st->last_v4_host);
        Py_CLEAR(st->send_host_obj);
        Py_CLEAR(st->str_active);
    }
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
    state_t *st = get_state((PyObject *)module);
    if (st == NULL) {
        return;
    }
    PyMem_Free(st->recv_msgs);
    PyMem_Free(st->recv_iov);
    PyMem_Free(st->recv_names);
    PyMem_Free(st->send_msgs);
    PyMem_Free(st->send_iov);
    PyMem_Free(st->send_names);
    PyMem_Free(st->stream_buf);
    PyMem_Free(st->events);
    free(st->recv_arena);
    memset(st, 0, sizeof *st);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    /* The shared buffers in the module state need the GIL (see Memory above). */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sockserve._speedups",
    .m_doc = "Socket I/O for sockserve's hot paths: recvmmsg/sendmmsg batches, recv/send, "
             "the epoll fast path (Linux). The contract: sockserve._engine.fastio.",
    .m_size = sizeof(state_t),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module_def);
}
