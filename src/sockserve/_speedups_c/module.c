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
 * - poll_fast: one epoll_wait, and the plain requests it finds answered here (raw,
 *   line and length framing: a chunk's whole messages, their replies in one send).
 *
 * The units of this one extension module (this folder; speedups.h is what they
 * share): module.c, the module, its state and method table; args.c, the argument
 * checks; datagram_recv.c and datagram_send.c, the batches; stream.c, recv/send;
 * poll.c, poll_fast; framed.c, its line and length framing; tls.c, tls_serve (a TLS
 * connection's readable event, for server/tlsconn.py).
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
#include "speedups.h"

#include <stdlib.h>
#include <string.h>

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
    {"tls_serve", (PyCFunction)(void (*)(void))tls_serve, METH_FASTCALL,
     "tls_serve(fd, sslobj, bio_in, bio_out, member, handler, ctx, max_message) -> (tag, value)\n\n"
     "One readable event of a TLS connection: recv, decrypt, answer, encrypt, send (tls.c)."},
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
        tls_clear(st);
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
