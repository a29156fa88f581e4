/* One frame to many sockets in one call: the fan-out's system calls without the interpreter
 * between them.
 *
 * send_each(fds, data) sends the bytes of ``data`` to every file descriptor in the list
 * ``fds`` (a list of ints), each with one non-blocking send(2), with the GIL released for the
 * whole loop. It returns a list of (index, result) for every socket that did not take all of
 * ``data``: result is the number of bytes it took (0 when it would block, or when its fd is
 * negative, meaning "not a socket of ours") or -errno when the send failed. The caller hands
 * the rest to the connection's own transport, which buffers it or reports the error.
 *
 * Only sockets whose transport holds nothing unsent may be given here: bytes written behind a
 * transport's back must not overtake bytes it still buffers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* Python ignores SIGPIPE anyway; some systems lack the flag */
#endif

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
    }

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (handles[i] < 0) {
            sent[i] = 0;
            continue;
        }
        ssize_t r;
        do {
            r = send(handles[i], view.buf, (size_t)view.len, MSG_DONTWAIT | MSG_NOSIGNAL);
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
    Py_END_ALLOW_THREADS

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

static PyMethodDef methods[] = {
    {"send_each", (PyCFunction)(void (*)(void))send_each, METH_FASTCALL,
     "send_each(fds, data, /) -> list[tuple[int, int]]\n\n"
     "Send data to every socket in fds; return (index, bytes taken or -errno) for each that\n"
     "did not take all of it."},
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
    return PyModule_Create(&module);
}
