/* The private header of sockserve._speedups, included by each of its units (the
 * overview, and the rules every unit keeps, are in module.c).
 *
 * The units link into the one extension module, which exports PyInit__speedups
 * and nothing else: what one unit lends another is declared here HIDDEN (hidden
 * visibility, so it never clashes with another library's symbols), everything
 * else stays static in its unit.
 */
#ifndef SOCKSERVE_SPEEDUPS_H
#define SOCKSERVE_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#define HIDDEN __attribute__((visibility("hidden")))

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
/* tls_serve's tags beyond those (server/tlsconn.py's TLS_ERROR, TLS_CLOSED). */
enum { OUT_TLS_ERROR = 8, OUT_TLS_CLOSED = 9 };
/* Framing kinds a spec may name (fastio.py's KIND_*); KIND_PUMP: a relayed pair (pump.c). */
enum { KIND_RAW = 0, KIND_LINE = 1, KIND_LENGTH = 2, KIND_PUMP = 3 };
/* A pump spec's state: five int64s (moved, moved in big reads, pipe r/w fds, in the pipe). */
#define PUMP_STATE_SIZE 40

/* tls.c's names: the ssl exceptions and the method names it calls, looked up once. */
typedef struct {
    PyObject *want_read, *zero_return, *s_read, *s_write, *s_pending, *s_fd;
} tls_names_t;

/* The module state: module.c allocates and frees it, the units use it. */
typedef struct {
    /* recv_batch / send_batch kernel structures (see Memory in module.c). */
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
    tls_names_t tls; /* tls.c's, set at its first call */
} state_t;

static inline state_t *
get_state(PyObject *module)
{
    return (state_t *)PyModule_GetState(module);
}

/* args.c: the argument checks the entry points share. */
HIDDEN int int_arg(PyObject *obj, long long lo, long long hi, const char *what, PyObject *range,
                   long long *out);
HIDDEN int fd_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                   const char *signature, int *fd);
HIDDEN int require_udp(int fd, const char *who);

/* poll.c: what the fast path's units share. */
HIDDEN PyObject *take_exception(void);
HIDDEN int add_item(PyObject *rest, int fd, int tag, PyObject *value, PyObject *member);
/* framed.c: line and length framing on the fast path. */
HIDDEN int serve_framed(state_t *st, int fd, PyObject *key, PyObject *spec, PyObject *fast,
                        Py_ssize_t got, int kind, Py_ssize_t max, PyObject *items);
/* pump.c: the relay's pump (KIND_PUMP specs). */
HIDDEN int serve_pump(state_t *st, int fd, PyObject *spec, Py_ssize_t splice_after,
                      PyObject **value);

/* The functions of the module, for its method table in module.c. */
HIDDEN PyObject *recv_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
HIDDEN PyObject *send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
HIDDEN PyObject *stream_recv(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
HIDDEN PyObject *stream_recv_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
HIDDEN PyObject *stream_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
HIDDEN PyObject *poll_fast(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
HIDDEN PyObject *tls_serve(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
/* tls.c: drop its names (module_clear). */
HIDDEN void tls_clear(state_t *st);

#endif /* SOCKSERVE_SPEEDUPS_H */
