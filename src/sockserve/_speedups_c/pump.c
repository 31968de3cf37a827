/* sockserve._speedups: the relay's pump on the fast path (KIND_PUMP specs of poll_fast).
 *
 * A readable socket of a pumped pair is read here and what it gave is sent to its peer
 * in the same call, inside the epoll batch: no Python per chunk. What the peer does not
 * take goes back as PARTIAL (the member holds it and waits for EPOLLOUT on the peer,
 * reading of the source paused: backpressure), end of stream as EOF, a failure as
 * ERRNO. After a direction has moved SPLICE_AFTER-or-so bytes in big reads (the spec
 * says how many) it moves through a pipe with splice(2): the bytes never enter user
 * space. The Python twin: serve_pump in _engine/fastpath.py; the contract: fastio.py.
 */
#include "speedups.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>

#ifndef F_SETPIPE_SZ
#define F_SETPIPE_SZ 1031
#endif

/* Reads per event at most while each fills the buffer: a bulk sender is drained in
 * fewer epoll rounds, and one busy pair still cannot hold the batch for long. */
#define PUMP_READS 4
/* A read this big counts towards the direction's splice threshold. */
#define BIG_READ 16384
/* Bytes a pump pipe holds (F_SETPIPE_SZ; the kernel's default of 64 KiB otherwise). */
#define PIPE_SIZE (256 * 1024)

static int
pump_fail(PyObject **value, int err)
{
    *value = PyLong_FromLong(err);
    return *value == NULL ? -1 : OUT_ERRNO;
}

/* Send all of buf to peer or as much as it takes: the count sent, or -1 (errno set). */
static ssize_t
send_some(int peer, const char *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t rc = send(peer, buf + done, len - done, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (rc < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            return -1;
        }
        done += (size_t)rc;
    }
    return (ssize_t)done;
}

/* Move what the pipe holds (left bytes) to peer: what is still left, or -1 (errno). */
static long long
drain_pipe(int pipe_r, int peer, long long left)
{
    while (left > 0) {
        ssize_t rc = splice(pipe_r, NULL, peer, NULL, (size_t)left, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (rc < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            return -1;
        }
        left -= rc;
    }
    return left;
}

/* The splice path: socket -> pipe -> peer. */
static int
pump_splice(int fd, int peer, long long *s, PyObject **value)
{
    for (int i = 0; i < PUMP_READS; i++) {
        ssize_t got = splice(fd, NULL, (int)s[3], NULL, PIPE_SIZE, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (got < 0) {
            if (errno == EINTR) {
                i--;
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return OUT_DONE;
            }
            return pump_fail(value, errno);
        }
        if (got == 0) {
            return OUT_EOF;
        }
        long long left = drain_pipe((int)s[2], peer, got);
        if (left < 0) {
            return pump_fail(value, errno);
        }
        s[0] += got - left;
        if (left) {
            s[4] = left; /* held in the pipe: the member sends it when peer is writable */
            *value = Py_NewRef(Py_None);
            return OUT_PARTIAL;
        }
        if (got < BIG_READ) {
            return OUT_DONE;
        }
    }
    return OUT_DONE;
}

/* Open the direction's pipe (s[2], s[3]); on failure (EMFILE...) it keeps copying. */
static void
open_pipe(long long *s)
{
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
        return;
    }
    (void)fcntl(fds[1], F_SETPIPE_SZ, PIPE_SIZE);
    s[2] = fds[0];
    s[3] = fds[1];
}

/* Serve one readable pumped socket (spec checked by poll.c for its shape and kind):
 * the outcome tag, *value a new reference where the tag has one, or -1 with an
 * exception that stops the batch. */
HIDDEN int
serve_pump(state_t *st, int fd, PyObject *spec, Py_ssize_t splice_after, PyObject **value)
{
    *value = NULL;
    long long peer_fd;
    if (int_arg(PyTuple_GET_ITEM(spec, 1), INT_MIN, INT_MAX, "poll_fast: a pump's peer fd",
                PyExc_OverflowError, &peer_fd) < 0) {
        return -1;
    }
    PyObject *state = PyTuple_GET_ITEM(spec, 2);
    if (!PyByteArray_CheckExact(state) || PyByteArray_GET_SIZE(state) < PUMP_STATE_SIZE) {
        PyErr_SetString(PyExc_TypeError, "poll_fast: a pump's state is a bytearray of 40 bytes");
        return -1;
    }
    long long *s = (long long *)PyByteArray_AS_STRING(state);
    int peer = (int)peer_fd;
    if (s[4] > 0) {
        *value = Py_NewRef(Py_None); /* still holding: not read until it has gone */
        return OUT_PARTIAL;
    }
    if (s[2] < 0 && s[1] >= (long long)splice_after) {
        open_pipe(s);
    }
    if (s[2] >= 0) {
        return pump_splice(fd, peer, s, value);
    }
    for (int i = 0; i < PUMP_READS; i++) {
        ssize_t got = recv(fd, st->stream_buf, MAX_SIZE, MSG_DONTWAIT);
        if (got < 0) {
            if (errno == EINTR) {
                i--;
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return OUT_DONE;
            }
            return pump_fail(value, errno);
        }
        if (got == 0) {
            return OUT_EOF;
        }
        ssize_t sent = send_some(peer, st->stream_buf, (size_t)got);
        if (sent < 0) {
            return pump_fail(value, errno);
        }
        s[0] += sent;
        if (sent < got) {
            *value = PyBytes_FromStringAndSize(st->stream_buf + sent, got - sent);
            return *value == NULL ? -1 : OUT_PARTIAL;
        }
        if (got >= BIG_READ) {
            s[1] += got;
        }
        if (got < MAX_SIZE) {
            return OUT_DONE;
        }
        if (s[2] < 0 && s[1] >= (long long)splice_after) {
            open_pipe(s);
            if (s[2] >= 0) {
                return pump_splice(fd, peer, s, value);
            }
        }
    }
    return OUT_DONE;
}
