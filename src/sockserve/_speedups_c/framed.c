/* sockserve._speedups: line and length framing on the fast path (KIND_LINE, KIND_LENGTH).
 *
 * poll.c reads one chunk of a fast connection; here it is split into whole messages,
 * each handled in order, their framed replies gathered and sent in one send (a flush
 * every FLUSH_AT bytes bounds what is gathered). The first thing this cannot finish
 * ends the chunk and goes back to Python as tagged items, in order; FastStream's codec
 * continues from exactly there (the rules: fastio.py's contract; the Python twin:
 * serve_framed in _engine/fastpath.py, which must match this line for line). */
#include "speedups.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>

/* Gathered replies are sent once they reach this (as the write high-water mark bounds
 * the slow path's buffer): what the kernel does not take then ends the chunk. */
#define FLUSH_AT MAX_SIZE
/* Largest body a 4-byte length prefix can express. */
#define MAX_FRAME 0xFFFFFFFFULL

/* The gathered replies, on the heap (module.c: nothing large on the C stack, as a
 * handler may poll again); 512 bytes at first, which pymalloc serves. */
typedef struct {
    char *buf;
    size_t len;
    size_t cap;
} gathered_t;

static int
gather(gathered_t *g, const char *head, size_t head_len, PyObject *reply, const char *tail,
       size_t tail_len)
{
    size_t body = (size_t)PyBytes_GET_SIZE(reply);
    size_t more = head_len + body + tail_len;
    if (g->cap - g->len < more) {
        size_t cap = g->cap ? g->cap : 512;
        while (cap - g->len < more) {
            cap *= 2;
        }
        char *grown = PyMem_Realloc(g->buf, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        g->buf = grown;
        g->cap = cap;
    }
    memcpy(g->buf + g->len, head, head_len);
    memcpy(g->buf + g->len + head_len, PyBytes_AS_STRING(reply), body);
    memcpy(g->buf + g->len + head_len + body, tail, tail_len);
    g->len += more;
    return 0;
}

/* Send the gathered replies. 0: all went; else the item that says what did not
 * (PARTIAL with the unsent rest, or ERRNO) is added, and 1 (or -1 on failure). */
static int
flush(gathered_t *g, int fd, PyObject *items, PyObject *member)
{
    ssize_t rc;
    do {
        rc = send(fd, g->buf, g->len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (rc < 0 && errno == EINTR);
    if (rc == (ssize_t)g->len) {
        g->len = 0;
        return 0;
    }
    PyObject *value;
    int tag = OUT_PARTIAL;
    if (rc < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        tag = OUT_ERRNO;
        value = PyLong_FromLong(errno);
    }
    else {
        size_t sent = rc < 0 ? 0 : (size_t)rc;
        value = PyBytes_FromStringAndSize(g->buf + sent, (Py_ssize_t)(g->len - sent));
    }
    g->len = 0;
    if (value == NULL || add_item(items, fd, tag, value, member) < 0) {
        return -1;
    }
    return tag == OUT_ERRNO ? 2 : 1;
}

/* Where the next whole message of p[0..len) lies: 1 with its body at p[*start..*start +
 * *body) and *used bytes taken, or 0: a partial tail, or a message over the cap (the
 * codec gives its error). A line ends at "\n", one "\r" before it stripped. */
static int
next_message(int kind, const char *p, Py_ssize_t len, Py_ssize_t max, Py_ssize_t *start,
             Py_ssize_t *body, Py_ssize_t *used)
{
    if (kind == KIND_LINE) {
        const char *nl = memchr(p, '\n', (size_t)len);
        if (nl == NULL) {
            return 0;
        }
        Py_ssize_t end = nl - p;
        *start = 0;
        *body = end > 0 && p[end - 1] == '\r' ? end - 1 : end;
        *used = end + 1;
        return *body <= max;
    }
    if (len < 4) {
        return 0;
    }
    const unsigned char *u = (const unsigned char *)p;
    uint32_t need = (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
    if ((unsigned long long)need > (unsigned long long)max || (Py_ssize_t)need > len - 4) {
        return 0;
    }
    *start = 4;
    *body = (Py_ssize_t)need;
    *used = 4 + (Py_ssize_t)need;
    return 1;
}

/* Add one reply, framed, to g. 0, or 1 when it must go back to Python (not exact bytes,
 * or too long to prefix), or -1. */
static int
frame_reply(gathered_t *g, int kind, PyObject *reply)
{
    if (!PyBytes_CheckExact(reply)) {
        return 1;
    }
    if (kind == KIND_LINE) {
        return gather(g, "", 0, reply, "\n", 1);
    }
    unsigned long long n = (unsigned long long)PyBytes_GET_SIZE(reply);
    if (n > MAX_FRAME) {
        return 1;
    }
    char prefix[4] = {(char)(n >> 24), (char)(n >> 16), (char)(n >> 8), (char)n};
    return gather(g, prefix, 4, reply, "", 0);
}

/* Serve the chunk of `got` bytes in st->stream_buf read from a fast connection of a
 * framed kind, adding its items to `items`: 0, or -1 with an exception that stops the
 * batch (what this chunk left unanswered is then lost with it). */
HIDDEN int
serve_framed(state_t *st, int fd, PyObject *key, PyObject *spec, PyObject *fast,
             Py_ssize_t got, int kind, Py_ssize_t max, PyObject *items)
{
    PyObject *member = PyTuple_GET_ITEM(spec, 0);
    PyObject *handler = PyTuple_GET_ITEM(spec, 1);
    PyObject *ctx = PyTuple_GET_ITEM(spec, 2);
    gathered_t g = {NULL, 0, 0};
    const char *p = st->stream_buf;
    Py_ssize_t len = got;
    PyObject *hold = NULL;             /* the chunk's unread part, once a handler may run */
    PyObject *stop = NULL;             /* what the handler raised, or returned for Python */
    int stop_tag = OUT_DONE, sent = 0; /* sent: 1 PARTIAL, 2 ERRNO added */
    int still_fast = 1, marked = 0, rc = -1;
    Py_ssize_t start, body, used;
    while (len > 0 && next_message(kind, p, len, max, &start, &body, &used)) {
        PyObject *msg = PyBytes_FromStringAndSize(p + start, body);
        if (msg == NULL) {
            goto done;
        }
        p += used;
        len -= used;
        if (hold == NULL && len > 0) {
            /* The handler may read another socket into the stream buffer. */
            hold = PyBytes_FromStringAndSize(p, len);
            if (hold == NULL) {
                Py_DECREF(msg);
                goto done;
            }
            p = PyBytes_AS_STRING(hold);
        }
        /* Marked active once per chunk, before its first whole message is handled:
         * nothing reads the flag until the chunk is done (the idle sweeper runs on the
         * loop), so once is as good as once per message, and cheaper. */
        if (!marked) {
            if (PyObject_SetAttr(member, st->str_active, Py_True) < 0) {
                Py_DECREF(msg);
                goto done;
            }
            marked = 1;
        }
        PyObject *call_args[2] = {msg, ctx};
        PyObject *reply = PyObject_Vectorcall(handler, call_args, 2, NULL);
        Py_DECREF(msg);
        if (reply == NULL) {
            stop = take_exception();
            if (stop == NULL) {
                PyErr_SetString(PyExc_SystemError,
                                "poll_fast: a handler failed without an exception");
                goto done;
            }
            stop_tag = OUT_RAISED;
            break;
        }
        /* Still the fast connection at fd (not closed, its fd not reused, not writing)? */
        PyObject *now = PyDict_GetItemWithError(fast, key);
        if (now == NULL && PyErr_Occurred()) {
            Py_DECREF(reply);
            goto done;
        }
        still_fast = now == spec;
        if (reply == Py_None) {
            Py_DECREF(reply);
            if (!still_fast) {
                break;
            }
            continue;
        }
        int framed = still_fast ? frame_reply(&g, kind, reply) : 1;
        if (framed != 0) {
            if (framed < 0) {
                Py_DECREF(reply);
                goto done;
            }
            stop = reply; /* Python frames it, or reports it */
            stop_tag = OUT_REPLY;
            break;
        }
        Py_DECREF(reply);
        if (g.len >= FLUSH_AT && (sent = flush(&g, fd, items, member)) != 0) {
            if (sent < 0) {
                goto done;
            }
            break;
        }
    }
    if (g.len > 0) {
        if (still_fast) {
            sent = flush(&g, fd, items, member);
        }
        else {
            /* Not ours to send any more: Python queues it before what follows. */
            PyObject *rest = PyBytes_FromStringAndSize(g.buf, (Py_ssize_t)g.len);
            sent = rest == NULL ? -1 : add_item(items, fd, OUT_PARTIAL, rest, member);
        }
        if (sent < 0) {
            goto done;
        }
    }
    if (stop != NULL) {
        int added = add_item(items, fd, stop_tag, stop, member);
        stop = NULL;
        if (added < 0) {
            goto done;
        }
    }
    /* The unread rest goes to the codec, unless the connection is failing anyway. */
    if (len > 0 && stop_tag != OUT_RAISED && sent != 2) {
        PyObject *rest = hold != NULL && p == PyBytes_AS_STRING(hold)
                             ? Py_NewRef(hold)
                             : PyBytes_FromStringAndSize(p, len);
        if (rest == NULL || add_item(items, fd, OUT_DATA, rest, member) < 0) {
            goto done;
        }
    }
    rc = 0;
done:
    Py_XDECREF(stop);
    Py_XDECREF(hold);
    PyMem_Free(g.buf);
    return rc;
}
