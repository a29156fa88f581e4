/* One frame to many sockets in one call: the fan-out's system calls without the interpreter
 * between them, and where the kernel allows it without one system call per socket.
 *
 * send_each(fds, data) sends the bytes of ``data`` to every file descriptor in the list
 * ``fds`` (a list of ints), each with one non-blocking send, with the GIL released for the
 * whole batch. It returns a list of (index, result) for every socket that did not take all of
 * ``data``: result is the number of bytes it took (0 when it would block, or when its fd is
 * negative, meaning "not a socket of ours") or -errno when the send failed. The caller hands
 * the rest to the connection's own transport, which buffers it or reports the error.
 *
 * Only sockets whose transport holds nothing unsent may be given here: bytes written behind a
 * transport's back must not overtake bytes it still buffers.
 *
 * The sends are made in one of two ways, with the same results:
 *
 * - "io_uring" (Linux 5.6 and later, where io_uring is not disabled or filtered): the sends
 *   of a batch go into an io_uring submission queue as IORING_OP_SEND with MSG_DONTWAIT, and
 *   one io_uring_enter(2) submits them all and collects their completions. A send that
 *   would block completes at once with -EAGAIN (MSG_DONTWAIT makes the request "nowait":
 *   io_uring does not park it to retry later), so every request has completed when the
 *   call returns, as with send(2). The kernel does the same work for each socket; what goes
 *   is a system call's entry and exit per socket, which on a virtual machine can cost more
 *   than the send itself (BENCHMARKS.md, issue 7).
 * - "send": one send(2) per socket, in a loop.
 *
 * The ring is set up on first use (or by set_io_uring(True)); when that fails the module uses
 * "send" for good and mode() says why. One ring serves the process; a call made while
 * another thread's call is using it takes the "send" loop. A forked child forgets the ring it
 * inherited (its memory is shared with the parent's) and sets up its own when it needs one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* Python ignores SIGPIPE anyway; some systems lack the flag */
#endif

#define SEND_FLAGS (MSG_DONTWAIT | MSG_NOSIGNAL)

/* -------------------------------------------------------------------- the send(2) loop */

/* Sends to handles[i] for i in [from, to), recording each result in sent[i]. */
static void
send_loop(const int *handles, Py_ssize_t *sent, Py_ssize_t from, Py_ssize_t to,
          const void *buf, size_t len)
{
    for (Py_ssize_t i = from; i < to; i++) {
        if (handles[i] < 0) {
            sent[i] = 0;
            continue;
        }
        ssize_t r;
        do {
            r = send(handles[i], buf, len, SEND_FLAGS);
        } while (r < 0 && errno == EINTR);
        if (r >= 0) {
            sent[i] = (Py_ssize_t)r;
        }
        else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            sent[i] = 0;
        }
        else {
            sent[i] = -(Py_ssize_t)errno;
        }
    }
}

/* -------------------------------------------------------------------- the io_uring path */

#if defined(__linux__) && __has_include(<linux/io_uring.h>)
#define HAVE_IO_URING 1
#include <linux/io_uring.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef IORING_FEAT_FAST_POLL /* headers of Linux 5.7 or later (IORING_OP_SEND is an enum) */
#undef HAVE_IO_URING
#endif
#endif

#ifdef HAVE_IO_URING

/* Submission entries of the ring: a batch larger than this goes in several submissions. The
 * server's batches are its fan-out slices (100 by default). */
#define RING_ENTRIES 256

typedef struct {
    int fd; /* -1: no ring */
    int busy; /* a call is using it (with the GIL released) */
    unsigned *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_len, cq_len, sqes_len;
    unsigned entries;
} Ring;

static Ring ring = {.fd = -1};

static void
ring_close(void)
{
    if (ring.sqes != NULL && ring.sqes != MAP_FAILED) {
        munmap(ring.sqes, ring.sqes_len);
    }
    if (ring.cq_map != NULL && ring.cq_map != MAP_FAILED && ring.cq_map != ring.sq_map) {
        munmap(ring.cq_map, ring.cq_len);
    }
    if (ring.sq_map != NULL && ring.sq_map != MAP_FAILED) {
        munmap(ring.sq_map, ring.sq_len);
    }
    if (ring.fd >= 0) {
        close(ring.fd);
    }
    memset(&ring, 0, sizeof ring);
    ring.fd = -1;
}

/* Sets the ring up; 0, or an errno value (the ring is then closed). */
static int
ring_open(void)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int fd = (int)syscall(__NR_io_uring_setup, RING_ENTRIES, &p);
    if (fd < 0) {
        return errno;
    }
    memset(&ring, 0, sizeof ring);
    ring.fd = fd;
    if (!(p.features & IORING_FEAT_FAST_POLL)) {
        /* Before Linux 5.7: IORING_OP_SEND may be missing (5.6), and what is there was not
         * measured; the plain loop is used. */
        ring_close();
        return ENOSYS;
    }
    ring.entries = p.sq_entries;
    ring.sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    ring.cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && ring.cq_len > ring.sq_len) {
        ring.sq_len = ring.cq_len;
    }
    ring.sq_map = mmap(NULL, ring.sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                       IORING_OFF_SQ_RING);
    if (ring.sq_map == MAP_FAILED) {
        goto failed;
    }
    ring.cq_map = single ? ring.sq_map
                         : mmap(NULL, ring.cq_len, PROT_READ | PROT_WRITE,
                                MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    if (ring.cq_map == MAP_FAILED) {
        goto failed;
    }
    ring.sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    ring.sqes = mmap(NULL, ring.sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQES);
    if (ring.sqes == MAP_FAILED) {
        goto failed;
    }
    char *sq = ring.sq_map, *cq = ring.cq_map;
    ring.sq_tail = (unsigned *)(sq + p.sq_off.tail);
    ring.sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    ring.sq_array = (unsigned *)(sq + p.sq_off.array);
    ring.cq_head = (unsigned *)(cq + p.cq_off.head);
    ring.cq_tail = (unsigned *)(cq + p.cq_off.tail);
    ring.cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    ring.cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;

failed:;
    int err = errno;
    ring_close();
    return err;
}

/* Takes every completion in the ring into sent[]; returns how many. */
static unsigned
ring_reap(Py_ssize_t *sent)
{
    unsigned head = *ring.cq_head; /* only this side moves it */
    unsigned tail = __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE);
    unsigned mask = *ring.cq_mask, taken = 0;
    for (; head != tail; head++, taken++) {
        struct io_uring_cqe *cqe = &ring.cqes[head & mask];
        int res = cqe->res;
        sent[cqe->user_data] = res == -EAGAIN || res == -EWOULDBLOCK ? 0 : (Py_ssize_t)res;
    }
    __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
    return taken;
}

/* Sends to handles[i] for i in [from, to) through the ring, recording each result in sent[i].
 * Returns 0, or the errno of a failure of io_uring itself (not of a send): the ring has then
 * been closed, and the sends it did not complete were made the plain way, so that none is
 * made twice or left out. */
static int
ring_send(const int *handles, Py_ssize_t *sent, Py_ssize_t from, Py_ssize_t to,
          const void *buf, size_t len)
{
    Py_ssize_t i = from;
    while (i < to) {
        /* Fill the queue with up to ring.entries sends. */
        unsigned tail = *ring.sq_tail, mask = *ring.sq_mask, queued = 0;
        Py_ssize_t first = i;
        for (; i < to && queued < ring.entries; i++) {
            if (handles[i] < 0) {
                sent[i] = 0;
                continue;
            }
            unsigned slot = tail & mask;
            struct io_uring_sqe *sqe = &ring.sqes[slot];
            memset(sqe, 0, sizeof *sqe);
            sqe->opcode = IORING_OP_SEND;
            sqe->fd = handles[i];
            sqe->addr = (unsigned long)buf;
            sqe->len = (unsigned)len;
            sqe->msg_flags = SEND_FLAGS;
            sqe->user_data = (unsigned long long)i;
            ring.sq_array[slot] = slot;
            tail++;
            queued++;
        }
        if (queued == 0) {
            continue;
        }
        __atomic_store_n(ring.sq_tail, tail, __ATOMIC_RELEASE);
        /* Submit them and wait for every completion: each completes inline (nowait). */
        unsigned submitted = 0, completed = 0;
        while (completed < queued) {
            unsigned to_submit = queued - submitted;
            long r = syscall(__NR_io_uring_enter, ring.fd, to_submit, queued - completed,
                             IORING_ENTER_GETEVENTS, NULL, 0);
            if (r < 0) {
                if (errno == EINTR) {
                    completed += ring_reap(sent);
                    continue;
                }
                int err = errno;
                ring_reap(sent);
                ring_close();
                for (Py_ssize_t j = first; j < to; j++) {
                    if (sent[j] == PY_SSIZE_T_MIN) {
                        send_loop(handles, sent, j, j + 1, buf, len);
                    }
                }
                return err;
            }
            submitted += (unsigned)r;
            completed += ring_reap(sent);
        }
    }
    return 0;
}

/* The io_uring mode: 1 use it (set up on first use), 0 do not. */
static int want_ring = 1;
/* Why io_uring is not used (an errno value: its set-up failed, or it failed later), or 0. */
static int ring_error = 0;

/* Whether the ring is set up (setting it up if it is wanted and was never tried). */
static int
ring_ready(void)
{
    if (!want_ring || ring_error != 0) {
        return 0;
    }
    if (ring.fd < 0) {
        ring_error = ring_open();
    }
    return ring_error == 0;
}

/* The ring, held by this call (ring.busy) until it gives it back; 0 if the loop must be used:
 * no ring, or another thread's call holds it. */
static int
ring_take(void)
{
    if (ring.busy || !ring_ready()) {
        return 0;
    }
    ring.busy = 1;
    return 1;
}

#endif /* HAVE_IO_URING */

/* -------------------------------------------------------------------- the module */

static PyObject *
send_each(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send_each(fds, data) takes exactly 2 arguments");
        return NULL;
    }
    PyObject *fds = args[0];
    if (!PyList_Check(fds)) {
        PyErr_SetString(PyExc_TypeError, "send_each: fds must be a list of ints");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(fds);
    int *handles = PyMem_New(int, n > 0 ? n : 1);
    Py_ssize_t *sent = PyMem_New(Py_ssize_t, n > 0 ? n : 1);
    PyObject *result = NULL;
    if (handles == NULL || sent == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (fd == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (fd > INT_MAX || fd < INT_MIN) {
            PyErr_Format(PyExc_ValueError, "send_each: fds[%zd] = %ld is not a file descriptor", i, fd);
            goto done;
        }
        handles[i] = (int)fd;
        sent[i] = PY_SSIZE_T_MIN; /* not sent yet */
    }

#ifdef HAVE_IO_URING
    /* One socket: a send(2) costs less than an io_uring_enter(2). */
    if (n > 1 && ring_take()) {
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = ring_send(handles, sent, 0, n, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
        ring.busy = 0;
        if (failed) {
            ring_error = failed; /* io_uring failed after it was set up: not used again */
        }
    }
    else
#endif
    {
        Py_BEGIN_ALLOW_THREADS
        send_loop(handles, sent, 0, n, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    }

    result = PyList_New(0);
    if (result == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (sent[i] == view.len) {
            continue;
        }
        PyObject *item = Py_BuildValue("(nn)", i, sent[i]);
        if (item == NULL || PyList_Append(result, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(result);
            goto done;
        }
        Py_DECREF(item);
    }

done:
    PyMem_Free(handles);
    PyMem_Free(sent);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
mode(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    (void)module;
#ifdef HAVE_IO_URING
    if (ring_ready()) {
        return PyUnicode_FromString("io_uring");
    }
    if (want_ring) {
        return PyUnicode_FromFormat("send (io_uring unavailable: %s)", strerror(ring_error));
    }
    return PyUnicode_FromString("send");
#else
    return PyUnicode_FromString("send (io_uring not built)");
#endif
}

static PyObject *
set_io_uring(PyObject *module, PyObject *arg)
{
    int enable = PyObject_IsTrue(arg);
    if (enable < 0) {
        return NULL;
    }
#ifdef HAVE_IO_URING
    want_ring = enable;
    if (!enable && ring.fd >= 0 && !ring.busy) {
        ring_close();
    }
#else
    (void)enable;
#endif
    return mode(module, NULL);
}

static PyMethodDef methods[] = {
    {"send_each", (PyCFunction)(void (*)(void))send_each, METH_FASTCALL,
     "send_each(fds, data, /) -> list[tuple[int, int]]\n\n"
     "Send data to every socket in fds; return (index, bytes taken or -errno) for each that\n"
     "did not take all of it."},
    {"mode", (PyCFunction)mode, METH_NOARGS,
     "mode() -> str\n\n"
     "How send_each sends: \"io_uring\", or \"send\" (with why io_uring is not used, if it\n"
     "was wanted). Sets the ring up if it is wanted and not set up yet."},
    {"set_io_uring", (PyCFunction)set_io_uring, METH_O,
     "set_io_uring(enabled, /) -> str\n\n"
     "Use io_uring for send_each's batches (the default) or not; returns mode()."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_sendeach",
    .m_doc = "One frame to many sockets in one call.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__sendeach(void)
{
#ifdef HAVE_IO_URING
    static int registered = 0;
    if (!registered) {
        /* In a forked child the ring is the parent's, its queues shared with it: the child
         * lets go of its copy (no other thread came along, so no call holds it; ring_close
         * only unmaps, closes and clears, which is safe in a child of a threaded process) and
         * sets up its own when it needs one. Not a check in every call: getpid() would be a
         * system call per batch. */
        int err = pthread_atfork(NULL, NULL, ring_close);
        if (err != 0) {
            ring_error = err; /* a child could not tell its ring from the parent's: no ring */
        }
        registered = 1;
    }
#endif
    return PyModule_Create(&module);
}
