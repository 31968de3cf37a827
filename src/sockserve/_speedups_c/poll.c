/* sockserve._speedups: poll_fast, the epoll hub's fast path. One epoll_wait; the
 * plain requests it finds are answered here (serve_fast; line and length framing in
 * framed.c), everything else goes back to Python as a tagged outcome (the outcomes:
 * fastio.py; the Python twin of serve_fast: _engine/fastpath.py). */
#include "speedups.h"

#include <errno.h>

/* The exception being raised, taken (the 3.12+ API where there is one). */
HIDDEN PyObject *
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

/* Check one spec, (member, handler, ctx, max_message, kind); 0 with *max and *kind set,
 * or -1. */
static int
check_spec(PyObject *spec, Py_ssize_t *max, int *kind)
{
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "poll_fast: a spec is (member, handler, ctx, max_message, kind)");
        return -1;
    }
    long long value, which;
    if (int_arg(PyTuple_GET_ITEM(spec, 3), 0, PY_SSIZE_T_MAX, "poll_fast: max_message",
                PyExc_ValueError, &value) < 0 ||
        int_arg(PyTuple_GET_ITEM(spec, 4), KIND_RAW, KIND_PUMP, "poll_fast: kind",
                PyExc_ValueError, &which) < 0) {
        return -1;
    }
    *max = (Py_ssize_t)value;
    *kind = (int)which;
    return 0;
}

/* Serve one readable fast connection: recv; raw framing here (call the handler, send
 * its reply), line and length framing in framed.c. Returns the outcome tag, with *value
 * a new reference (NULL for OUT_DONE and OUT_EOF); OUT_DONE too when serve_framed added
 * its own items; or -1 with an exception that stops the batch. */
static int
serve_fast(state_t *st, int fd, PyObject *key, PyObject *spec, PyObject *fast, PyObject **value,
           PyObject *items)
{
    *value = NULL;
    Py_ssize_t max;
    int kind;
    if (check_spec(spec, &max, &kind) < 0) {
        return -1;
    }
    if (kind == KIND_PUMP) {
        return serve_pump(st, fd, spec, max, value); /* max: its splice threshold */
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
    if (kind != KIND_RAW) {
        return serve_framed(st, fd, key, spec, fast, (Py_ssize_t)got, kind, max, items) < 0
                   ? -1
                   : OUT_DONE;
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
HIDDEN int
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
HIDDEN PyObject *
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
                int tag = serve_fast(st, fd, key, spec, fast, &value, rest);
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
