/* exporter._h2_core: the compiled twin of exporter.h2.FrameReader (issue 11).
 *
 * A port, not a redesign: every path of the Python walker has its counterpart here
 * under the same name (feed, _resume, _head, _collected, _passed, _frame,
 * _start_block, _end_block), the callbacks are made in the same order with the same
 * arguments, and H2Error is raised at the same point with the same message. The
 * differential test (tests/unit/test_h2_core.py) holds the two to that.
 *
 * The budget stays the Python object the observer shares between its parts: this
 * walker calls its take() and give() exactly where the Python one does (only on the
 * rare paths: a frame split over reads, a header block waiting for CONTINUATION), so
 * everything that reads budget.left sees the same value at every step.
 *
 * DATA chunks reach their target as slices of one memoryview of the fed object, as
 * in Python: a target that kept one would keep the object alive, not a dangling
 * pointer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define T_DATA 0x0
#define T_HEADERS 0x1
#define T_PRIORITY 0x2
#define T_RST_STREAM 0x3
#define T_SETTINGS 0x4
#define T_PUSH_PROMISE 0x5
#define T_PING 0x6
#define T_GOAWAY 0x7
#define T_WINDOW_UPDATE 0x8
#define T_CONTINUATION 0x9

#define FLAG_END_STREAM 0x1
#define FLAG_ACK 0x1
#define FLAG_END_HEADERS 0x4
#define FLAG_PADDED 0x8
#define FLAG_PRIORITY 0x20
#define BLOCK_FLAGS (FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY)

/* exporter.h2's own constants, read at import so that they have one home. */
static Py_ssize_t MAX_HEADER_BLOCK; /* h2.MAX_HEADER_BLOCK */
static Py_ssize_t GOAWAY_FIXED;     /* h2._GOAWAY_FIXED */
static char PREFACE[64];            /* h2.PREFACE */
static int PREFACE_LEN;

/* Walker states, as exporter.h2's. */
#define S_HEAD 0
#define S_BODY 1
#define S_PASS 2

/* exporter.h2._SHAPES by frame type, read at import: name (NULL: a type without a
 * shape, ignored), fixed length (-1: any), on a stream (1), on the connection (0) or
 * either (-1). */
static struct {
    PyObject *name;
    Py_ssize_t size;
    int on_stream;
} SHAPES[256];

static PyObject *H2Error;    /* exporter.h2.H2Error */
static PyObject *BudgetType; /* exporter.h2.Budget */
static PyObject *str_take;
static PyObject *str_give;
static PyObject *str_cast;
static PyObject *str_B;
static PyObject *default_budget_total; /* 1 << 62 */

typedef struct {
    PyObject_HEAD
    PyObject *on_headers;
    PyObject *data_target;
    PyObject *on_data_end;
    PyObject *on_rst_stream; /* NULL: the Python reader's no-op default */
    PyObject *on_settings;
    PyObject *on_goaway;
    PyObject *on_push_promise;
    PyObject *budget;
    PyObject *target; /* DataFeed of the DATA payload being passed on; NULL or None: none */
    int preface_seen;
    int state;
    int busy; /* inside feed: a re-entrant feed would interleave two walks */
    /* A frame header split over reads. */
    unsigned char hbuf[9];
    int hlen;
    /* The payload (or its first bytes) being collected in S_BODY. */
    unsigned char *buf;
    Py_ssize_t blen;
    Py_ssize_t bcap;
    Py_ssize_t need;
    Py_ssize_t held; /* budget taken for the frame being collected */
    Py_ssize_t left;
    Py_ssize_t pad;
    int type;
    int flags;
    unsigned long stream;
    Py_ssize_t length;
    /* A header block waiting for its CONTINUATION frames (has_block: `_block is not None`). */
    int has_block;
    unsigned char *block;
    Py_ssize_t block_len;
    Py_ssize_t block_cap;
    unsigned long block_stream;
    int block_end_stream;
    int block_push;
} Reader;

/* -- calls into Python ------------------------------------------------------------ */

/* Vectorcall with a spare slot before the arguments, so that a bound method (what
 * the observer hands in) is called without a temporary argument tuple. */
static int
call_n(PyObject *callable, PyObject **args, size_t nargs)
{
    if (callable == NULL) /* the no-op default */
        return 0;
    Py_INCREF(callable);
    PyObject *res =
        PyObject_Vectorcall(callable, args, nargs | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(callable);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

static int
call_stream(PyObject *callable, unsigned long stream)
{
    if (callable == NULL)
        return 0;
    PyObject *id = PyLong_FromUnsignedLong(stream);
    if (id == NULL)
        return -1;
    PyObject *stack[2] = {NULL, id};
    int rc = call_n(callable, stack + 1, 1);
    Py_DECREF(id);
    return rc;
}

static int
call_two(PyObject *callable, unsigned long a, unsigned long b)
{
    if (callable == NULL)
        return 0;
    PyObject *x = PyLong_FromUnsignedLong(a);
    if (x == NULL)
        return -1;
    PyObject *y = PyLong_FromUnsignedLong(b);
    if (y == NULL) {
        Py_DECREF(x);
        return -1;
    }
    PyObject *stack[3] = {NULL, x, y};
    int rc = call_n(callable, stack + 1, 2);
    Py_DECREF(x);
    Py_DECREF(y);
    return rc;
}

/* data_target(stream): a new reference (maybe None), or NULL with an exception. */
static PyObject *
lookup_target(Reader *self, unsigned long stream)
{
    PyObject *id = PyLong_FromUnsignedLong(stream);
    if (id == NULL)
        return NULL;
    PyObject *stack[2] = {NULL, id};
    PyObject *callable = self->data_target;
    Py_INCREF(callable);
    PyObject *res =
        PyObject_Vectorcall(callable, stack + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(callable);
    Py_DECREF(id);
    return res;
}

/* target(mv[start:stop]) where mv is the fed object's memoryview. */
static int
feed_target(PyObject *target, PyObject *whole, Py_ssize_t start, Py_ssize_t stop)
{
    PyObject *chunk = PySequence_GetSlice(whole, start, stop);
    if (chunk == NULL)
        return -1;
    PyObject *stack[2] = {NULL, chunk};
    int rc = call_n(target, stack + 1, 1);
    Py_DECREF(chunk);
    return rc;
}

static int
on_headers(Reader *self, unsigned long stream, PyObject *block, int end_stream)
{
    PyObject *id = PyLong_FromUnsignedLong(stream);
    if (id == NULL)
        return -1;
    PyObject *stack[4] = {NULL, id, block, end_stream ? Py_True : Py_False};
    int rc = call_n(self->on_headers, stack + 1, 3);
    Py_DECREF(id);
    return rc;
}

/* budget.<method>(size): its result (a new reference), or NULL with an exception. */
static PyObject *
budget_call(Reader *self, PyObject *method, Py_ssize_t size)
{
    PyObject *n = PyLong_FromSsize_t(size);
    if (n == NULL)
        return NULL;
    PyObject *res = PyObject_CallMethodOneArg(self->budget, method, n);
    Py_DECREF(n);
    return res;
}

/* budget.take(size): 1 taken, 0 refused, -1 an exception. */
static int
budget_take(Reader *self, Py_ssize_t size)
{
    PyObject *res = budget_call(self, str_take, size);
    if (res == NULL)
        return -1;
    int ok = PyObject_IsTrue(res);
    Py_DECREF(res);
    return ok;
}

static int
budget_give(Reader *self, Py_ssize_t size)
{
    PyObject *res = budget_call(self, str_give, size);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* -- buffers ---------------------------------------------------------------------- */

static int
append(unsigned char **data, Py_ssize_t *len, Py_ssize_t *cap, const unsigned char *src,
       Py_ssize_t n)
{
    if (n <= 0)
        return 0;
    if (*len + n > *cap) {
        Py_ssize_t want = *cap ? *cap : 64;
        while (want < *len + n)
            want *= 2;
        unsigned char *grown = PyMem_Realloc(*data, (size_t)want);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        *data = grown;
        *cap = want;
    }
    memcpy(*data + *len, src, (size_t)n);
    *len += n;
    return 0;
}

static void
free_buffers(Reader *self)
{
    PyMem_Free(self->buf);
    self->buf = NULL;
    self->blen = self->bcap = 0;
    PyMem_Free(self->block);
    self->block = NULL;
    self->block_len = self->block_cap = 0;
    self->has_block = 0;
}

/* -- checks (exporter.h2._check, _check_padding, _check_block) -------------------- */

static int
check(int ftype, int flags, Py_ssize_t length, unsigned long stream)
{
    PyObject *name = SHAPES[ftype].name;
    if (name == NULL)
        return 0;
    Py_ssize_t size = SHAPES[ftype].size;
    int on_stream = SHAPES[ftype].on_stream;
    if (size >= 0 && length != size) {
        PyErr_Format(H2Error, "bad %U length %zd", name, length);
        return -1;
    }
    if (on_stream == 1 && !stream) {
        PyErr_Format(H2Error, "%U on stream 0", name);
        return -1;
    }
    if (on_stream == 0 && stream) {
        PyErr_Format(H2Error, "%U on a stream", name);
        return -1;
    }
    if (ftype == T_SETTINGS && (length % 6 || ((flags & FLAG_ACK) && length))) {
        PyErr_SetString(H2Error, "bad SETTINGS length");
        return -1;
    }
    if (ftype == T_GOAWAY && length < GOAWAY_FIXED) {
        PyErr_SetString(H2Error, "GOAWAY truncated");
        return -1;
    }
    return 0;
}

/* exporter.h2._SKIP_WHEN: PING and WINDOW_UPDATE frames of exactly their shape carry
 * nothing the observer needs. */
static inline int
skipped(int ftype, Py_ssize_t length, unsigned long stream)
{
    if (ftype != T_PING && ftype != T_WINDOW_UPDATE)
        return 0;
    int on_stream = SHAPES[ftype].on_stream;
    return length == SHAPES[ftype].size && (on_stream < 0 || on_stream == (stream != 0));
}

static int
check_block(Reader *self, int ftype, unsigned long stream)
{
    if (ftype != T_CONTINUATION || stream != self->block_stream) {
        PyErr_SetString(H2Error, "header block interrupted");
        return -1;
    }
    return 0;
}

static int
bad_padding(void)
{
    PyErr_SetString(H2Error, "bad padding");
    return -1;
}

/* _unpad: the payload without its padding, as an offset and a length. */
static int
unpad(const unsigned char *payload, Py_ssize_t len, int flags, Py_ssize_t *start,
      Py_ssize_t *size)
{
    if (!(flags & FLAG_PADDED)) {
        *start = 0;
        *size = len;
        return 0;
    }
    Py_ssize_t pad = len ? payload[0] : 0;
    if (pad >= len)
        return bad_padding();
    *start = 1;
    *size = len - 1 - pad;
    return 0;
}

/* -- the walk --------------------------------------------------------------------- */

static int
end_block(Reader *self, PyObject *block)
{
    if (self->block_push) {
        PyObject *stack[2] = {NULL, block};
        return call_n(self->on_push_promise, stack + 1, 1);
    }
    return on_headers(self, self->block_stream, block, self->block_end_stream);
}

static int
start_block(Reader *self, const unsigned char *fragment, Py_ssize_t len, unsigned long stream,
            int flags, int push)
{
    self->block_stream = stream;
    self->block_push = push;
    self->block_end_stream = (flags & FLAG_END_STREAM) != 0;
    if (flags & FLAG_END_HEADERS) {
        PyObject *block = PyBytes_FromStringAndSize((const char *)fragment, len);
        if (block == NULL)
            return -1;
        int rc = end_block(self, block);
        Py_DECREF(block);
        return rc;
    }
    int ok = budget_take(self, len);
    if (ok < 0)
        return -1;
    if (!ok) {
        PyErr_SetString(H2Error, "header block over the connection's memory budget");
        return -1;
    }
    PyMem_Free(self->block);
    self->block = NULL;
    self->block_len = self->block_cap = 0;
    self->has_block = 1;
    return append(&self->block, &self->block_len, &self->block_cap, fragment, len);
}

static PyObject *
settings_list(const unsigned char *p, Py_ssize_t len)
{
    PyObject *list = PyList_New(len / 6);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < len / 6; i++) {
        const unsigned char *s = p + 6 * i;
        unsigned long ident = ((unsigned long)s[0] << 8) | s[1];
        unsigned long value = ((unsigned long)s[2] << 24) | ((unsigned long)s[3] << 16) |
                              ((unsigned long)s[4] << 8) | s[5];
        PyObject *pair = Py_BuildValue("(kk)", ident, value);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    return list;
}

static inline unsigned long
u32(const unsigned char *p)
{
    return ((unsigned long)p[0] << 24) | ((unsigned long)p[1] << 16) |
           ((unsigned long)p[2] << 8) | p[3];
}

/* _frame: a frame whose header check() accepted, with all its payload at hand (all
 * that matters of it for GOAWAY). `whole` is the fed object's memoryview and `off`
 * the payload's place in it, or NULL for a payload this walker collected (never a
 * DATA one: padded DATA is collected by its pad length only). */
static int
frame(Reader *self, int ftype, int flags, unsigned long stream, const unsigned char *payload,
      Py_ssize_t len, PyObject *whole, Py_ssize_t off)
{
    Py_ssize_t start, size;
    switch (ftype) {
    case T_HEADERS:
        if (unpad(payload, len, flags, &start, &size) < 0)
            return -1;
        if (flags & FLAG_PRIORITY) {
            if (size < 5) {
                PyErr_SetString(H2Error, "HEADERS priority truncated");
                return -1;
            }
            start += 5;
            size -= 5;
        }
        return start_block(self, payload + start, size, stream, flags, 0);
    case T_CONTINUATION: {
        if (!self->has_block) {
            PyErr_SetString(H2Error, "CONTINUATION without HEADERS");
            return -1;
        }
        if (self->block_len + len > MAX_HEADER_BLOCK) {
            PyErr_SetString(H2Error, "header block too large");
            return -1;
        }
        int ok = budget_take(self, len);
        if (ok < 0)
            return -1;
        if (!ok) {
            PyErr_SetString(H2Error, "header block over the connection's memory budget");
            return -1;
        }
        if (append(&self->block, &self->block_len, &self->block_cap, payload, len) < 0)
            return -1;
        if (flags & FLAG_END_HEADERS) {
            unsigned char *data = self->block;
            Py_ssize_t n = self->block_len;
            self->block = NULL;
            self->block_len = self->block_cap = 0;
            self->has_block = 0;
            if (budget_give(self, n) < 0) {
                PyMem_Free(data);
                return -1;
            }
            PyObject *block = PyBytes_FromStringAndSize((const char *)data, n);
            PyMem_Free(data);
            if (block == NULL)
                return -1;
            int rc = end_block(self, block);
            Py_DECREF(block);
            return rc;
        }
        return 0;
    }
    case T_DATA: { /* padded, whole at hand */
        if (unpad(payload, len, flags, &start, &size) < 0)
            return -1;
        PyObject *target = lookup_target(self, stream);
        if (target == NULL)
            return -1;
        int rc = 0;
        if (target != Py_None && size) {
            if (whole != NULL) {
                rc = feed_target(target, whole, off + start, off + start + size);
            }
            else { /* not reached (see above); a copy keeps it correct anyway */
                PyObject *copy = PyBytes_FromStringAndSize((const char *)payload + start, size);
                PyObject *mv = copy ? PyMemoryView_FromObject(copy) : NULL;
                Py_XDECREF(copy);
                if (mv == NULL) {
                    rc = -1;
                }
                else {
                    PyObject *stack[2] = {NULL, mv};
                    rc = call_n(target, stack + 1, 1);
                    Py_DECREF(mv);
                }
            }
        }
        Py_DECREF(target);
        if (rc < 0)
            return -1;
        if (flags & FLAG_END_STREAM)
            return call_stream(self->on_data_end, stream);
        return 0;
    }
    case T_RST_STREAM:
        return call_two(self->on_rst_stream, stream, u32(payload));
    case T_SETTINGS: {
        if (self->on_settings == NULL) {
            return 0;
        }
        PyObject *list = (flags & FLAG_ACK) ? PyList_New(0) : settings_list(payload, len);
        if (list == NULL)
            return -1;
        PyObject *stack[3] = {NULL, (flags & FLAG_ACK) ? Py_True : Py_False, list};
        int rc = call_n(self->on_settings, stack + 1, 2);
        Py_DECREF(list);
        return rc;
    }
    case T_GOAWAY:
        return call_two(self->on_goaway, u32(payload) & 0x7FFFFFFFUL, u32(payload + 4));
    case T_PUSH_PROMISE:
        if (unpad(payload, len, flags, &start, &size) < 0)
            return -1;
        if (size < 4) {
            PyErr_SetString(H2Error, "bad PUSH_PROMISE");
            return -1;
        }
        return start_block(self, payload + start + 4, size - 4, stream, flags & ~FLAG_END_STREAM,
                           1);
    default: /* PRIORITY, PING, WINDOW_UPDATE: nothing to follow beyond their shape */
        return 0;
    }
}

static int
passed(Reader *self)
{
    if (self->pad) {
        self->state = S_PASS;
        self->left = self->pad;
        self->pad = 0;
        Py_CLEAR(self->target);
        return 0;
    }
    self->state = S_HEAD;
    self->need = 9;
    Py_CLEAR(self->target);
    if (self->type == T_DATA && (self->flags & FLAG_END_STREAM))
        return call_stream(self->on_data_end, self->stream);
    return 0;
}

/* _head: a frame header (9 bytes at h) whose payload does not follow whole in this
 * feed, or that came split over reads. */
static int
head(Reader *self, const unsigned char *h)
{
    Py_ssize_t length = ((Py_ssize_t)h[0] << 16) | ((Py_ssize_t)h[1] << 8) | h[2];
    int ftype = h[3], flags = h[4];
    unsigned long stream = u32(h + 5) & 0x7FFFFFFFUL;
    self->type = ftype;
    self->flags = flags;
    self->stream = stream;
    self->length = length;
    if (self->has_block && check_block(self, ftype, stream) < 0)
        return -1;
    if (check(ftype, flags, length, stream) < 0)
        return -1;
    if (ftype == T_DATA && !(flags & FLAG_PADDED)) {
        PyObject *target = lookup_target(self, stream);
        if (target == NULL)
            return -1;
        Py_XSETREF(self->target, target);
        if (length) {
            self->state = S_PASS;
            self->left = length;
            return 0;
        }
        return passed(self);
    }
    if (ftype > T_CONTINUATION) {
        /* Unknown frame types are ignored (RFC 9113 section 5.5): skip unbuffered. */
        Py_CLEAR(self->target);
        if (length) {
            self->state = S_PASS;
            self->left = length;
        }
        return 0;
    }
    if (length) {
        /* Padded DATA: only the pad length, the rest is streamed. GOAWAY: only what
         * precedes its debug data. */
        Py_ssize_t need = length;
        if (ftype == T_DATA)
            need = 1;
        else if (ftype == T_GOAWAY)
            need = GOAWAY_FIXED;
        int ok = budget_take(self, need);
        if (ok < 0)
            return -1;
        if (!ok) {
            PyErr_Format(H2Error, "a %zd-byte frame is over the connection's memory budget",
                         need);
            return -1;
        }
        self->held = need;
        self->state = S_BODY;
        self->need = need;
        return 0;
    }
    return frame(self, ftype, flags, stream, (const unsigned char *)"", 0, NULL, 0);
}

/* _collected: the collected start or whole of a frame whose header head() read. */
static int
collected(Reader *self, const unsigned char *payload, Py_ssize_t len)
{
    int ftype = self->type;
    Py_ssize_t length = self->length;
    if (ftype == T_DATA) { /* padded: pass the data on, then skip the padding */
        Py_ssize_t pad = payload[0];
        if (pad >= length)
            return bad_padding();
        PyObject *target = lookup_target(self, self->stream);
        if (target == NULL)
            return -1;
        Py_XSETREF(self->target, target);
        self->pad = pad;
        self->state = S_PASS;
        self->left = length - 1 - pad;
        if (!self->left)
            return passed(self);
        return 0;
    }
    if (ftype == T_GOAWAY) {
        if (frame(self, ftype, self->flags, self->stream, payload, len, NULL, 0) < 0)
            return -1;
        if (length > GOAWAY_FIXED) {
            Py_CLEAR(self->target);
            self->state = S_PASS;
            self->left = length - GOAWAY_FIXED;
        }
        return 0;
    }
    return frame(self, ftype, self->flags, self->stream, payload, len, NULL, 0);
}

/* _resume: carry the frame in progress on with mv[pos:end]; returns where it ended
 * (end when it still is not complete), or -1 with an exception. */
static Py_ssize_t
resume(Reader *self, PyObject *whole, const unsigned char *mv, Py_ssize_t pos, Py_ssize_t end)
{
    while (pos < end) {
        int state = self->state;
        if (state == S_PASS) {
            Py_ssize_t take = self->left < end - pos ? self->left : end - pos;
            PyObject *target = self->target;
            if (target != NULL && target != Py_None) {
                Py_INCREF(target);
                int rc = feed_target(target, whole, pos, pos + take);
                Py_DECREF(target);
                if (rc < 0)
                    return -1;
            }
            pos += take;
            self->left -= take;
            if (!self->left) {
                if (passed(self) < 0)
                    return -1;
                if (self->state == S_HEAD)
                    return pos;
            }
            continue;
        }
        if (state == S_HEAD) {
            if (!self->hlen)
                return pos;
            Py_ssize_t take = 9 - self->hlen < end - pos ? 9 - self->hlen : end - pos;
            memcpy(self->hbuf + self->hlen, mv + pos, (size_t)take);
            self->hlen += (int)take;
            pos += take;
            if (self->hlen < 9)
                return pos;
            unsigned char h[9];
            memcpy(h, self->hbuf, 9);
            self->hlen = 0;
            if (head(self, h) < 0)
                return -1;
            continue;
        }
        Py_ssize_t take = self->need - self->blen < end - pos ? self->need - self->blen : end - pos;
        if (append(&self->buf, &self->blen, &self->bcap, mv + pos, take) < 0)
            return -1;
        pos += take;
        if (self->blen < self->need)
            return pos;
        /* Hand the buffer over: what collected() calls back may not see it. */
        unsigned char *payload = self->buf;
        Py_ssize_t len = self->blen;
        self->buf = NULL;
        self->blen = self->bcap = 0;
        self->state = S_HEAD;
        self->need = 9;
        int rc = collected(self, payload, len);
        PyMem_Free(payload);
        if (rc < 0)
            return -1;
        if (budget_give(self, self->held) < 0)
            return -1;
        self->held = 0;
        if (self->state == S_HEAD)
            return pos;
    }
    return pos;
}

static int
check_preface(Reader *self, const unsigned char *mv, Py_ssize_t len, Py_ssize_t *pos)
{
    int seen = self->preface_seen;
    Py_ssize_t take = PREFACE_LEN - seen < len ? PREFACE_LEN - seen : len;
    if (memcmp(mv, PREFACE + seen, (size_t)take) != 0) {
        PyErr_SetString(H2Error, "missing client preface");
        return -1;
    }
    self->preface_seen = seen + (int)take;
    *pos = take;
    return 0;
}

static int
walk(Reader *self, PyObject *whole, const unsigned char *mv, Py_ssize_t end)
{
    Py_ssize_t pos = 0;
    if (self->preface_seen < PREFACE_LEN && check_preface(self, mv, end, &pos) < 0)
        return -1;
    if (self->state != S_HEAD || self->hlen) {
        pos = resume(self, whole, mv, pos, end);
        if (pos < 0)
            return -1;
    }
    /* A stream's DATA frames come in runs (a log streams in many): its target is
     * looked up once per run. Any other frame may change it, and ends the run. */
    long run_stream = -1;
    PyObject *run_target = NULL;
    while (pos < end) {
        if (end - pos < 9) {
            memcpy(self->hbuf, mv + pos, (size_t)(end - pos));
            self->hlen = (int)(end - pos);
            break;
        }
        const unsigned char *h = mv + pos;
        Py_ssize_t length = ((Py_ssize_t)h[0] << 16) | ((Py_ssize_t)h[1] << 8) | h[2];
        int ftype = h[3], flags = h[4];
        unsigned long stream = u32(h + 5) & 0x7FFFFFFFUL;
        Py_ssize_t body = pos + 9;
        Py_ssize_t stop = body + length;
        if (self->has_block && check_block(self, ftype, stream) < 0)
            goto error;
        if (stop > end || ftype > T_CONTINUATION) {
            if (head(self, h) < 0)
                goto error;
            pos = resume(self, whole, mv, body, end);
            if (pos < 0)
                goto error;
            run_stream = -1;
            continue;
        }
        if (ftype == T_DATA && !(flags & FLAG_PADDED) && stream) {
            if ((long)stream != run_stream) {
                PyObject *target = lookup_target(self, stream);
                if (target == NULL)
                    goto error;
                Py_XSETREF(run_target, target);
                run_stream = (long)stream;
            }
            if (run_target != Py_None && length &&
                feed_target(run_target, whole, body, stop) < 0)
                goto error;
            if (flags & FLAG_END_STREAM) {
                run_stream = -1;
                if (call_stream(self->on_data_end, stream) < 0)
                    goto error;
            }
            pos = stop;
            continue;
        }
        run_stream = -1;
        if (ftype == T_HEADERS && (flags & BLOCK_FLAGS) == FLAG_END_HEADERS && stream) {
            PyObject *block = PyBytes_FromStringAndSize((const char *)mv + body, length);
            if (block == NULL)
                goto error;
            int rc = on_headers(self, stream, block, flags & FLAG_END_STREAM);
            Py_DECREF(block);
            if (rc < 0)
                goto error;
        }
        else if (skipped(ftype, length, stream)) {
        }
        else if (check(ftype, flags, length, stream) < 0 ||
                 frame(self, ftype, flags, stream, mv + body, length, whole, body) < 0) {
            goto error;
        }
        pos = stop;
    }
    Py_XDECREF(run_target);
    return 0;
error:
    Py_XDECREF(run_target);
    return -1;
}

/* -- the type --------------------------------------------------------------------- */

static PyObject *
Reader_feed(Reader *self, PyObject *data)
{
    if (self->budget == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FrameReader.__init__ was not called");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "FrameReader.feed called from its own callback");
        return NULL;
    }
    PyObject *whole = PyMemoryView_FromObject(data);
    if (whole == NULL)
        return NULL;
    Py_buffer *view = PyMemoryView_GET_BUFFER(whole);
    if (view->ndim != 1 || view->itemsize != 1) {
        PyObject *bytes_view = PyObject_CallMethodOneArg(whole, str_cast, str_B);
        Py_DECREF(whole);
        if (bytes_view == NULL)
            return NULL;
        whole = bytes_view;
        view = PyMemoryView_GET_BUFFER(whole);
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        Py_DECREF(whole);
        PyErr_SetString(PyExc_BufferError, "FrameReader.feed needs a contiguous buffer");
        return NULL;
    }
    self->busy = 1;
    int rc = walk(self, whole, (const unsigned char *)view->buf, view->len);
    self->busy = 0;
    Py_DECREF(whole);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Reader_held(Reader *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->held + (self->has_block ? self->block_len : 0));
}

static int
Reader_init(Reader *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"preface",       "on_headers",  "data_target",
                               "on_data_end",   "on_rst_stream", "on_settings",
                               "on_goaway",     "on_push_promise", "budget",
                               NULL};
    PyObject *preface = NULL, *on_headers_ = NULL, *data_target = NULL, *on_data_end = NULL;
    PyObject *on_rst_stream = NULL, *on_settings = NULL, *on_goaway = NULL;
    PyObject *on_push_promise = NULL, *budget = NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "FrameReader.__init__ called from its own callback");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOOOOOOO:FrameReader", keywords, &preface,
                                     &on_headers_, &data_target, &on_data_end, &on_rst_stream,
                                     &on_settings, &on_goaway, &on_push_promise, &budget))
        return -1;
    const char *missing = preface == NULL       ? "preface"
                          : on_headers_ == NULL ? "on_headers"
                          : data_target == NULL ? "data_target"
                          : on_data_end == NULL ? "on_data_end"
                                                : NULL;
    if (missing != NULL) {
        PyErr_Format(PyExc_TypeError,
                     "FrameReader.__init__() missing required keyword-only argument: '%s'",
                     missing);
        return -1;
    }
    int with_preface = PyObject_IsTrue(preface);
    if (with_preface < 0)
        return -1;
    if (budget == NULL || budget == Py_None) {
        budget = PyObject_CallOneArg(BudgetType, default_budget_total);
        if (budget == NULL)
            return -1;
    }
    else {
        Py_INCREF(budget);
    }
    Py_XSETREF(self->budget, budget);
    Py_XSETREF(self->on_headers, Py_NewRef(on_headers_));
    Py_XSETREF(self->data_target, Py_NewRef(data_target));
    Py_XSETREF(self->on_data_end, Py_NewRef(on_data_end));
    Py_XSETREF(self->on_rst_stream, Py_XNewRef(on_rst_stream));
    Py_XSETREF(self->on_settings, Py_XNewRef(on_settings));
    Py_XSETREF(self->on_goaway, Py_XNewRef(on_goaway));
    Py_XSETREF(self->on_push_promise, Py_XNewRef(on_push_promise));
    Py_CLEAR(self->target);
    free_buffers(self);
    self->preface_seen = with_preface ? 0 : PREFACE_LEN;
    self->state = S_HEAD;
    self->hlen = 0;
    self->need = 9;
    self->held = self->left = self->pad = 0;
    self->type = self->flags = 0;
    self->stream = 0;
    self->length = 0;
    self->block_stream = 0;
    self->block_end_stream = self->block_push = 0;
    return 0;
}

static int
Reader_traverse(Reader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_headers);
    Py_VISIT(self->data_target);
    Py_VISIT(self->on_data_end);
    Py_VISIT(self->on_rst_stream);
    Py_VISIT(self->on_settings);
    Py_VISIT(self->on_goaway);
    Py_VISIT(self->on_push_promise);
    Py_VISIT(self->budget);
    Py_VISIT(self->target);
    return 0;
}

static int
Reader_clear(Reader *self)
{
    /* The budget first: feed refuses to walk without it, so a finalizer run by one of
     * the clears below that fed this reader would not find it half cleared. */
    Py_CLEAR(self->budget);
    Py_CLEAR(self->on_headers);
    Py_CLEAR(self->data_target);
    Py_CLEAR(self->on_data_end);
    Py_CLEAR(self->on_rst_stream);
    Py_CLEAR(self->on_settings);
    Py_CLEAR(self->on_goaway);
    Py_CLEAR(self->on_push_promise);
    Py_CLEAR(self->target);
    return 0;
}

static void
Reader_dealloc(Reader *self)
{
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    free_buffers(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Reader_methods[] = {
    {"feed", (PyCFunction)Reader_feed, METH_O,
     "feed(data): walk the next bytes of this direction (bytes, bytearray, memoryview)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"held", (getter)Reader_held, NULL,
     "Bytes of the budget this walker holds (a split frame, a header block).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "exporter._h2_core.FrameReader",
    .tp_doc = "The compiled twin of exporter.h2.FrameReader: the same constructor, "
              "callbacks, budget traffic and errors.",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "exporter._h2_core",
    .m_doc = "The compiled HTTP/2 frame walker of the observer (exporter.h2's twin).",
    .m_size = -1,
};

static Py_ssize_t
read_size(PyObject *h2, const char *name)
{
    PyObject *value = PyObject_GetAttrString(h2, name);
    if (value == NULL)
        return -1;
    Py_ssize_t size = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return size;
}

static int
shape_error(const char *what)
{
    PyErr_Format(PyExc_ImportError, "exporter._h2_core cannot follow exporter.h2: %s", what);
    return -1;
}

/* The constants of exporter.h2 this walker applies, or -1 with ImportError when they
 * are not of a kind it knows (then the observer runs pure Python, all of it). */
static int
read_constants(PyObject *h2)
{
    MAX_HEADER_BLOCK = read_size(h2, "MAX_HEADER_BLOCK");
    GOAWAY_FIXED = read_size(h2, "_GOAWAY_FIXED");
    if (MAX_HEADER_BLOCK < 0 || GOAWAY_FIXED < 0)
        return PyErr_Occurred() ? -1 : shape_error("a negative size");
    PyObject *preface = PyObject_GetAttrString(h2, "PREFACE");
    if (preface == NULL)
        return -1;
    if (!PyBytes_Check(preface) || PyBytes_GET_SIZE(preface) >= (Py_ssize_t)sizeof(PREFACE)) {
        Py_DECREF(preface);
        return shape_error("PREFACE");
    }
    PREFACE_LEN = (int)PyBytes_GET_SIZE(preface);
    memcpy(PREFACE, PyBytes_AS_STRING(preface), (size_t)PREFACE_LEN);
    Py_DECREF(preface);
    PyObject *shapes = PyObject_GetAttrString(h2, "_SHAPES");
    if (shapes == NULL)
        return -1;
    if (!PyDict_Check(shapes)) {
        Py_DECREF(shapes);
        return shape_error("_SHAPES");
    }
    Py_ssize_t i = 0;
    PyObject *key, *value;
    while (PyDict_Next(shapes, &i, &key, &value)) {
        long ftype = PyLong_Check(key) ? PyLong_AsLong(key) : -1;
        PyObject *name, *size, *on_stream;
        if (ftype < 0 || ftype > 255 || !PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 3 ||
            !PyUnicode_Check(name = PyTuple_GET_ITEM(value, 0)) ||
            !((size = PyTuple_GET_ITEM(value, 1)) == Py_None || PyLong_Check(size)) ||
            !((on_stream = PyTuple_GET_ITEM(value, 2)) == Py_None || PyBool_Check(on_stream))) {
            Py_DECREF(shapes);
            PyErr_Clear();
            return shape_error("_SHAPES");
        }
        SHAPES[ftype].size = size == Py_None ? -1 : PyLong_AsSsize_t(size);
        if (SHAPES[ftype].size < -1 || PyErr_Occurred()) {
            Py_DECREF(shapes);
            PyErr_Clear();
            return shape_error("_SHAPES");
        }
        SHAPES[ftype].on_stream = on_stream == Py_None ? -1 : on_stream == Py_True;
        Py_INCREF(name);
        Py_XSETREF(SHAPES[ftype].name, name);
    }
    Py_DECREF(shapes);
    return 0;
}

PyMODINIT_FUNC
PyInit__h2_core(void)
{
    PyObject *h2 = PyImport_ImportModule("exporter.h2");
    if (h2 == NULL)
        return NULL;
    H2Error = PyObject_GetAttrString(h2, "H2Error");
    BudgetType = PyObject_GetAttrString(h2, "Budget");
    int rc = (H2Error == NULL || BudgetType == NULL) ? -1 : read_constants(h2);
    Py_DECREF(h2);
    if (rc < 0)
        return NULL;
    str_take = PyUnicode_InternFromString("take");
    str_give = PyUnicode_InternFromString("give");
    str_cast = PyUnicode_InternFromString("cast");
    str_B = PyUnicode_InternFromString("B");
    default_budget_total = PyLong_FromUnsignedLongLong(1ULL << 62);
    if (str_take == NULL || str_give == NULL || str_cast == NULL || str_B == NULL ||
        default_budget_total == NULL)
        return NULL;
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FrameReader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
