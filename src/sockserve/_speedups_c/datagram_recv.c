/* sockserve._speedups: recv_batch, a batch of datagrams per recvmmsg(2), and the
 * addresses it makes of their sources (the last IPv4 host str cached). */
#include "speedups.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>

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
HIDDEN PyObject *
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
