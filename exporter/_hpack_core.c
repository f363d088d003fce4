/* exporter._hpack_core: the compiled twin of `hpack.Decoder(...).decode(block, raw=True)`
 * as the observer uses it (issue 11).
 *
 * A port of hpack 4.2.0's decoder, quirks included, so that the differential tests
 * (tests/unit/test_hpack_core.py) can require the same headers, the same dynamic
 * table and the same exception class on every input:
 *
 * - integers are read as hpack's decode_integer reads them: a continuation octet
 *   with its high bit set after the fourth one fails, so values reach about 2**35
 *   (held in 64 bits, never wrapping);
 * - a size update after a decoded header fails; each update is checked against
 *   max_allowed_table_size, and so is the table size at the end of the block;
 * - the header list size (32 + name + value per header) is checked after each header,
 *   after a literal with incremental indexing was already added to the table;
 * - an entry larger than the table empties it; index 0 and indexes past the table
 *   raise hpack's InvalidTableIndex;
 * - Huffman strings are decoded by the nibble state machine hpack uses: a byte at a
 *   time in two 4-bit steps, failing on EOS and on padding that is not 1 to 7 one
 *   bits. The machine is built at import from the code lengths of RFC 7541 (the
 *   generated _hpack_huffman.h); the tests prove it equal to hpack's table.
 *
 * The limits (max_header_list_size, max_allowed_table_size, header_table_size) are
 * 64-bit integers where hpack's are unbounded: a value past that raises OverflowError
 * when set, which the observer never does (it caps them far below).
 *
 * After an exception the decoder's state is unspecified (as hpack's is): the observer
 * stops observing the connection. The GIL is held throughout. Memory: the dynamic
 * table only. Entries are (name, value) tuples of bytes, shared with the results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>
#include <string.h>

#include "_hpack_huffman.h"

/* hpack.hpack.VARINT_MAX_LENGTH: decode_integer fails once it has read more octets. */
#define VARINT_MAX_LENGTH 5
/* RFC 7541 section 4.1: an entry's size is its name and value plus this overhead. */
#define ENTRY_OVERHEAD 32
#define DEFAULT_TABLE_SIZE 4096
#define DEFAULT_MAX_HEADER_LIST_SIZE 65536
/* Huffman output bytes decoded on the stack; longer strings take the heap. */
#define HUFFMAN_STACK 512

/* hpack's exceptions, so that `except HPACKError` catches ours. */
static PyObject *DecodingError;
static PyObject *InvalidTableIndex;
static PyObject *OversizedHeaderListError;
static PyObject *InvalidTableSizeError;

/* -- Huffman ------------------------------------------------------------------------ */

/* The flags of one step, with hpack.huffman_table's values. */
enum { HUFFMAN_COMPLETE = 1, HUFFMAN_EMIT_SYMBOL = 2, HUFFMAN_FAIL = 4 };
#define HUFFMAN_SYMBOLS 257
#define HUFFMAN_EOS 256
#define HUFFMAN_STATES 256 /* the code tree's internal nodes; state 0 is the root */

typedef struct {
    uint8_t next;
    uint8_t flags;
    uint8_t symbol;
} huffman_step;

/* huffman_steps[state * 16 + nibble]: what reading 4 bits in a state does. */
static huffman_step huffman_steps[HUFFMAN_STATES * 16];

/* Builds huffman_steps from the canonical code's lengths; -1 (error set) when the
 * lengths are not a complete prefix code of HUFFMAN_STATES internal nodes. */
static int
huffman_build(void)
{
    /* child[node][bit]: > 0 an internal node, < 0 the leaf of symbol -(child + 1),
     * 0 none yet (the root is nobody's child). */
    int16_t child[HUFFMAN_STATES][2];
    uint8_t depth[HUFFMAN_STATES];
    uint8_t all_ones[HUFFMAN_STATES]; /* whether the path from the root is all 1 bits */
    int nodes = 1;
    uint32_t code = 0;
    memset(child, 0, sizeof(child));
    depth[0] = 0;
    all_ones[0] = 1;

    for (int length = 1; length <= 30; length++) {
        for (int symbol = 0; symbol < HUFFMAN_SYMBOLS; symbol++) {
            if (HPACK_HUFFMAN_LENGTHS[symbol] != length) {
                continue;
            }
            if (code >> length) {
                goto bad;
            }
            int node = 0;
            for (int bit_index = length - 1; bit_index >= 0; bit_index--) {
                int bit = (code >> bit_index) & 1;
                int16_t next = child[node][bit];
                if (next < 0) {
                    goto bad; /* passes through a leaf */
                }
                if (bit_index == 0) {
                    if (next != 0) {
                        goto bad;
                    }
                    child[node][bit] = (int16_t)(-(symbol + 1));
                }
                else {
                    if (next == 0) {
                        if (nodes == HUFFMAN_STATES) {
                            goto bad;
                        }
                        next = (int16_t)nodes++;
                        child[node][bit] = next;
                        depth[next] = (uint8_t)(depth[node] + 1);
                        all_ones[next] = (uint8_t)(all_ones[node] && bit);
                    }
                    node = next;
                }
            }
            code++;
        }
        code <<= 1;
    }
    if (nodes != HUFFMAN_STATES) {
        goto bad;
    }
    for (int state = 0; state < HUFFMAN_STATES; state++) {
        for (int nibble = 0; nibble < 16; nibble++) {
            huffman_step *step = &huffman_steps[state * 16 + nibble];
            int node = state;
            step->flags = 0;
            step->symbol = 0;
            for (int bit_index = 3; bit_index >= 0; bit_index--) {
                int16_t next = child[node][(nibble >> bit_index) & 1];
                if (next == 0) {
                    goto bad; /* an incomplete code */
                }
                if (next > 0) {
                    node = next;
                    continue;
                }
                int symbol = -next - 1;
                if (symbol == HUFFMAN_EOS) {
                    step->flags = HUFFMAN_FAIL;
                    step->symbol = 0;
                    node = 0;
                    break;
                }
                /* Codes are at least 5 bits: one symbol per nibble at most. */
                if (step->flags & HUFFMAN_EMIT_SYMBOL) {
                    goto bad;
                }
                step->flags = HUFFMAN_EMIT_SYMBOL;
                step->symbol = (uint8_t)symbol;
                node = 0;
            }
            step->next = (uint8_t)node;
            /* A string may end here when what follows the last symbol is padding:
             * 1 to 7 one bits (RFC 7541 section 5.2), or nothing. */
            if (!(step->flags & HUFFMAN_FAIL) && (node == 0 || (all_ones[node] && depth[node] <= 7))) {
                step->flags |= HUFFMAN_COMPLETE;
            }
        }
    }
    return 0;
bad:
    PyErr_SetString(PyExc_SystemError, "_hpack_huffman.h is not a complete prefix code");
    return -1;
}

/* hpack.huffman_table.decode_huffman: a new bytes object, or NULL (error set). */
static PyObject *
huffman_decode(const uint8_t *data, Py_ssize_t length)
{
    uint8_t stack[HUFFMAN_STACK];
    uint8_t *out = stack;
    Py_ssize_t produced = 0;
    unsigned state = 0;
    unsigned flags = 0;
    PyObject *result = NULL;

    if (length == 0) {
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    /* At most one symbol per nibble. */
    if (length > PY_SSIZE_T_MAX / 2) {
        return PyErr_NoMemory();
    }
    if (length * 2 > HUFFMAN_STACK) {
        out = PyMem_Malloc((size_t)length * 2);
        if (out == NULL) {
            return PyErr_NoMemory();
        }
    }
    for (Py_ssize_t i = 0; i < length; i++) {
        const huffman_step *step = &huffman_steps[state * 16 + (data[i] >> 4)];
        if (step->flags & HUFFMAN_FAIL) {
            goto invalid;
        }
        if (step->flags & HUFFMAN_EMIT_SYMBOL) {
            out[produced++] = step->symbol;
        }
        step = &huffman_steps[step->next * 16 + (data[i] & 0x0F)];
        if (step->flags & HUFFMAN_FAIL) {
            goto invalid;
        }
        if (step->flags & HUFFMAN_EMIT_SYMBOL) {
            out[produced++] = step->symbol;
        }
        state = step->next;
        flags = step->flags;
    }
    if (!(flags & HUFFMAN_COMPLETE)) {
        PyErr_SetString(DecodingError, "Incomplete Huffman string");
        goto done;
    }
    result = PyBytes_FromStringAndSize((const char *)out, produced);
    goto done;
invalid:
    PyErr_SetString(DecodingError, "Invalid Huffman string");
done:
    if (out != stack) {
        PyMem_Free(out);
    }
    return result;
}

/* -- tables ------------------------------------------------------------------------- */

/* RFC 7541 Appendix A. */
static const char *const STATIC_TABLE[][2] = {
    {":authority", ""},
    {":method", "GET"},
    {":method", "POST"},
    {":path", "/"},
    {":path", "/index.html"},
    {":scheme", "http"},
    {":scheme", "https"},
    {":status", "200"},
    {":status", "204"},
    {":status", "206"},
    {":status", "304"},
    {":status", "400"},
    {":status", "404"},
    {":status", "500"},
    {"accept-charset", ""},
    {"accept-encoding", "gzip, deflate"},
    {"accept-language", ""},
    {"accept-ranges", ""},
    {"accept", ""},
    {"access-control-allow-origin", ""},
    {"age", ""},
    {"allow", ""},
    {"authorization", ""},
    {"cache-control", ""},
    {"content-disposition", ""},
    {"content-encoding", ""},
    {"content-language", ""},
    {"content-length", ""},
    {"content-location", ""},
    {"content-range", ""},
    {"content-type", ""},
    {"cookie", ""},
    {"date", ""},
    {"etag", ""},
    {"expect", ""},
    {"expires", ""},
    {"from", ""},
    {"host", ""},
    {"if-match", ""},
    {"if-modified-since", ""},
    {"if-none-match", ""},
    {"if-range", ""},
    {"if-unmodified-since", ""},
    {"last-modified", ""},
    {"link", ""},
    {"location", ""},
    {"max-forwards", ""},
    {"proxy-authenticate", ""},
    {"proxy-authorization", ""},
    {"range", ""},
    {"referer", ""},
    {"refresh", ""},
    {"retry-after", ""},
    {"server", ""},
    {"set-cookie", ""},
    {"strict-transport-security", ""},
    {"transfer-encoding", ""},
    {"user-agent", ""},
    {"vary", ""},
    {"via", ""},
    {"www-authenticate", ""},
};
#define STATIC_LENGTH ((int64_t)(sizeof(STATIC_TABLE) / sizeof(STATIC_TABLE[0])))

/* The static table's entries as (name, value) tuples, built at import. */
static PyObject *static_entries[sizeof(STATIC_TABLE) / sizeof(STATIC_TABLE[0])];

typedef struct {
    PyObject_HEAD
    /* The dynamic table, a ring of (name, value) tuples: the i-th newest entry is
     * ring[(head + i) & (capacity - 1)]; capacity is 0 or a power of two. */
    PyObject **ring;
    Py_ssize_t capacity;
    Py_ssize_t head;
    Py_ssize_t count;
    int64_t size;    /* the sum of the entries' sizes */
    int64_t maxsize; /* HeaderTable.maxsize: header_table_size */
    long long max_allowed_table_size;
    long long max_header_list_size;
} Decoder;

static int64_t
entry_size(PyObject *entry)
{
    return ENTRY_OVERHEAD + (int64_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 0)) +
           (int64_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1));
}

static void
table_clear(Decoder *self)
{
    while (self->count > 0) {
        Py_ssize_t at = (self->head + self->count - 1) & (self->capacity - 1);
        PyObject *entry = self->ring[at];
        self->ring[at] = NULL;
        self->count--;
        Py_DECREF(entry); /* a tuple of bytes: no Python code runs */
    }
    self->head = 0;
    self->size = 0;
}

static void
table_pop_oldest(Decoder *self)
{
    Py_ssize_t at = (self->head + self->count - 1) & (self->capacity - 1);
    PyObject *entry = self->ring[at];
    self->ring[at] = NULL;
    self->count--;
    self->size -= entry_size(entry);
    Py_DECREF(entry);
}

/* HeaderTable._shrink. */
static void
table_shrink(Decoder *self)
{
    while (self->size > self->maxsize && self->count > 0) {
        table_pop_oldest(self);
    }
}

/* HeaderTable.add, taking a new reference to `entry`; -1 on MemoryError. */
static int
table_add(Decoder *self, PyObject *entry)
{
    int64_t size = entry_size(entry);
    if (size > self->maxsize) {
        table_clear(self);
        return 0;
    }
    /* hpack adds, then evicts the oldest while the table is over its size; the new
     * entry fits alone, so evicting first leaves the same table (and cannot overflow:
     * maxsize - size >= 0). */
    while (self->count > 0 && self->size > self->maxsize - size) {
        table_pop_oldest(self);
    }
    if (self->count == self->capacity) {
        Py_ssize_t capacity = self->capacity ? self->capacity * 2 : 16;
        if (capacity > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(PyObject *)) {
            PyErr_NoMemory();
            return -1;
        }
        PyObject **ring = PyMem_Malloc((size_t)capacity * sizeof(PyObject *));
        if (ring == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < self->count; i++) {
            ring[i] = self->ring[(self->head + i) & (self->capacity - 1)];
        }
        PyMem_Free(self->ring);
        self->ring = ring;
        self->capacity = capacity;
        self->head = 0;
    }
    self->head = (self->head - 1) & (self->capacity - 1);
    Py_INCREF(entry);
    self->ring[self->head] = entry;
    self->count++;
    self->size += size;
    return 0;
}

/* HeaderTable.maxsize's setter. */
static void
table_resize(Decoder *self, int64_t maxsize)
{
    int64_t old = self->maxsize;
    self->maxsize = maxsize;
    if (maxsize <= 0) {
        table_clear(self);
    }
    else if (old > maxsize) {
        table_shrink(self);
    }
}

/* HeaderTable.get_by_index: a borrowed entry, or NULL (InvalidTableIndex set). */
static PyObject *
table_get(Decoder *self, int64_t index)
{
    int64_t at = index - 1;
    if (at >= 0) {
        if (at < STATIC_LENGTH) {
            return static_entries[at];
        }
        at -= STATIC_LENGTH;
        if (at < self->count) {
            return self->ring[(self->head + (Py_ssize_t)at) & (self->capacity - 1)];
        }
    }
    PyErr_Format(InvalidTableIndex, "Invalid table index %lld", (long long)index);
    return NULL;
}

/* -- decoding ----------------------------------------------------------------------- */

/* hpack.hpack.decode_integer over data[0:length]: the octets consumed, or -1 (error
 * set). */
static Py_ssize_t
decode_integer(const uint8_t *data, Py_ssize_t length, int prefix_bits, int64_t *number)
{
    const int64_t max_number = ((int64_t)1 << prefix_bits) - 1;
    Py_ssize_t index = 1;
    int shift = 0;

    if (length < 1) {
        goto truncated;
    }
    *number = data[0] & max_number;
    if (*number != max_number) {
        return 1;
    }
    for (;;) {
        if (index >= length) {
            goto truncated;
        }
        uint8_t next = data[index++];
        if (next < 128) {
            *number += (int64_t)next << shift; /* shift <= 28 */
            return index;
        }
        *number += (int64_t)(next - 128) << shift;
        shift += 7;
        if (index > VARINT_MAX_LENGTH) {
            PyErr_SetString(DecodingError, "Variable integer representation is too long");
            return -1;
        }
    }
truncated:
    PyErr_SetString(DecodingError, "Unable to decode HPACK integer representation");
    return -1;
}

/* A string literal (RFC 7541 section 5.2) at data[0:length]: its bytes, and the octets
 * it took in *consumed; NULL with an error set. */
static PyObject *
decode_string(const uint8_t *data, Py_ssize_t length, Py_ssize_t *consumed)
{
    int64_t size;
    Py_ssize_t used = decode_integer(data, length, 7, &size);
    if (used < 0) {
        return NULL;
    }
    if (size > (int64_t)(length - used)) {
        PyErr_SetString(DecodingError, "Truncated header block");
        return NULL;
    }
    *consumed = used + (Py_ssize_t)size;
    if (data[0] & 0x80) {
        return huffman_decode(data + used, (Py_ssize_t)size);
    }
    return PyBytes_FromStringAndSize((const char *)data + used, (Py_ssize_t)size);
}

/* Decoder._decode_literal: a new (name, value) tuple, added to the table when
 * `should_index`; NULL with an error set. */
static PyObject *
decode_literal(Decoder *self, const uint8_t *data, Py_ssize_t length, int should_index,
               Py_ssize_t *consumed)
{
    PyObject *name;
    PyObject *value;
    PyObject *header;
    Py_ssize_t at;
    Py_ssize_t used;

    if (data[0] & (should_index ? 0x3F : 0x0F)) {
        int64_t index;
        at = decode_integer(data, length, should_index ? 6 : 4, &index);
        if (at < 0) {
            return NULL;
        }
        PyObject *entry = table_get(self, index);
        if (entry == NULL) {
            return NULL;
        }
        name = PyTuple_GET_ITEM(entry, 0);
        Py_INCREF(name);
    }
    else {
        name = decode_string(data + 1, length - 1, &used);
        if (name == NULL) {
            return NULL;
        }
        at = 1 + used;
    }
    value = decode_string(data + at, length - at, &used);
    if (value == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    *consumed = at + used;
    header = PyTuple_New(2);
    if (header == NULL) {
        Py_DECREF(name);
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(header, 0, name);
    PyTuple_SET_ITEM(header, 1, value);
    if (should_index && table_add(self, header) < 0) {
        Py_DECREF(header);
        return NULL;
    }
    return header;
}

static PyObject *
Decoder_decode(Decoder *self, PyObject *arg)
{
    Py_buffer view;
    PyObject *headers;
    int64_t inflated = 0;
    Py_ssize_t at = 0;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const uint8_t *data = view.buf;
    const Py_ssize_t length = view.len;
    headers = PyList_New(0);
    if (headers == NULL) {
        goto fail;
    }
    while (at < length) {
        const uint8_t first = data[at];
        PyObject *header;
        Py_ssize_t consumed;

        if (first & 0x80) {
            int64_t index;
            consumed = decode_integer(data + at, length - at, 7, &index);
            if (consumed < 0) {
                goto fail;
            }
            header = table_get(self, index);
            if (header == NULL) {
                goto fail;
            }
            Py_INCREF(header);
        }
        else if (first & 0x40) {
            header = decode_literal(self, data + at, length - at, 1, &consumed);
            if (header == NULL) {
                goto fail;
            }
        }
        else if (first & 0x20) {
            int64_t size;
            if (PyList_GET_SIZE(headers) > 0) {
                PyErr_SetString(DecodingError, "Table size update not at the start of the block");
                goto fail;
            }
            consumed = decode_integer(data + at, length - at, 5, &size);
            if (consumed < 0) {
                goto fail;
            }
            if (size > self->max_allowed_table_size) {
                PyErr_SetString(InvalidTableSizeError, "Encoder exceeded max allowable table size");
                goto fail;
            }
            table_resize(self, size);
            at += consumed;
            continue;
        }
        else {
            /* Without indexing, or never indexed (0x10): the same to a raw decode. */
            header = decode_literal(self, data + at, length - at, 0, &consumed);
            if (header == NULL) {
                goto fail;
            }
        }
        int append = PyList_Append(headers, header);
        int64_t size = entry_size(header);
        Py_DECREF(header);
        if (append < 0) {
            goto fail;
        }
        /* Saturating: a sum past 64 bits is past any limit. */
        if (size > INT64_MAX - inflated || inflated + size > self->max_header_list_size) {
            PyErr_Format(OversizedHeaderListError,
                         "A header list larger than %lld has been received",
                         self->max_header_list_size);
            goto fail;
        }
        inflated += size;
        at += consumed;
    }
    if (self->maxsize > self->max_allowed_table_size) {
        PyErr_SetString(InvalidTableSizeError, "Encoder did not shrink table size to within the max");
        goto fail;
    }
    PyBuffer_Release(&view);
    return headers;
fail:
    Py_XDECREF(headers);
    PyBuffer_Release(&view);
    return NULL;
}

/* -- the type ----------------------------------------------------------------------- */

static int
Decoder_init(Decoder *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"max_header_list_size", NULL};
    long long max_header_list_size = DEFAULT_MAX_HEADER_LIST_SIZE;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|L:Decoder", keywords,
                                     &max_header_list_size)) {
        return -1;
    }
    table_clear(self);
    self->maxsize = DEFAULT_TABLE_SIZE;
    self->max_allowed_table_size = DEFAULT_TABLE_SIZE;
    self->max_header_list_size = max_header_list_size;
    return 0;
}

static PyObject *
Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Decoder *self = (Decoder *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->maxsize = DEFAULT_TABLE_SIZE;
        self->max_allowed_table_size = DEFAULT_TABLE_SIZE;
        self->max_header_list_size = DEFAULT_MAX_HEADER_LIST_SIZE;
    }
    return (PyObject *)self;
}

static void
Decoder_dealloc(Decoder *self)
{
    table_clear(self);
    PyMem_Free(self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Decoder_get_header_table_size(Decoder *self, void *closure)
{
    return PyLong_FromLongLong(self->maxsize);
}

static int
Decoder_set_header_table_size(Decoder *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete header_table_size");
        return -1;
    }
    /* As hpack's setter: int(value). */
    PyObject *number = PyNumber_Long(value);
    if (number == NULL) {
        return -1;
    }
    long long maxsize = PyLong_AsLongLong(number);
    Py_DECREF(number);
    if (maxsize == -1 && PyErr_Occurred()) {
        return -1;
    }
    table_resize(self, maxsize);
    return 0;
}

static PyObject *
Decoder_get_dynamic_entries(Decoder *self, void *closure)
{
    PyObject *entries = PyTuple_New(self->count);
    if (entries == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        PyObject *entry = self->ring[(self->head + i) & (self->capacity - 1)];
        Py_INCREF(entry);
        PyTuple_SET_ITEM(entries, i, entry);
    }
    return entries;
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)Decoder_decode, METH_O,
     "decode(data) -> list of (name, value): hpack.Decoder.decode(data, raw=True)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Decoder_members[] = {
    {"max_header_list_size", T_LONGLONG, offsetof(Decoder, max_header_list_size), 0,
     "The largest header list (32 + name + value per header) a block may decode to."},
    {"max_allowed_table_size", T_LONGLONG, offsetof(Decoder, max_allowed_table_size), 0,
     "The largest table size the encoder may set (SETTINGS_HEADER_TABLE_SIZE)."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Decoder_getset[] = {
    {"header_table_size", (getter)Decoder_get_header_table_size,
     (setter)Decoder_set_header_table_size, "The dynamic table's size limit.", NULL},
    {"dynamic_entries", (getter)Decoder_get_dynamic_entries, NULL,
     "The dynamic table's (name, value) entries, newest first.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporter._hpack_core.Decoder",
    .tp_doc = "Decoder(max_header_list_size=65536): an HPACK decoder, as hpack.Decoder.",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Decoder_new,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_methods = Decoder_methods,
    .tp_members = Decoder_members,
    .tp_getset = Decoder_getset,
};

/* -- the module --------------------------------------------------------------------- */

static PyObject *
huffman_table(PyObject *module, PyObject *unused)
{
    /* Each step as 3 bytes: next state, flags, symbol (for the tests' proof). */
    uint8_t flat[sizeof(huffman_steps) / sizeof(huffman_steps[0]) * 3];
    for (size_t i = 0; i < sizeof(huffman_steps) / sizeof(huffman_steps[0]); i++) {
        flat[i * 3] = huffman_steps[i].next;
        flat[i * 3 + 1] = huffman_steps[i].flags;
        flat[i * 3 + 2] = huffman_steps[i].symbol;
    }
    return PyBytes_FromStringAndSize((const char *)flat, sizeof(flat));
}

static PyMethodDef module_methods[] = {
    {"_huffman_table", huffman_table, METH_NOARGS,
     "The Huffman state machine: (next state, flags, symbol) per (state, nibble)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "exporter._hpack_core",
    .m_doc = "The compiled twin of hpack's Decoder (issue 11).",
    .m_size = -1,
    .m_methods = module_methods,
};

static int
import_errors(void)
{
    PyObject *hpack = PyImport_ImportModule("hpack");
    if (hpack == NULL) {
        return -1;
    }
    DecodingError = PyObject_GetAttrString(hpack, "HPACKDecodingError");
    InvalidTableIndex = PyObject_GetAttrString(hpack, "InvalidTableIndex");
    OversizedHeaderListError = PyObject_GetAttrString(hpack, "OversizedHeaderListError");
    InvalidTableSizeError = PyObject_GetAttrString(hpack, "InvalidTableSizeError");
    Py_DECREF(hpack);
    if (!DecodingError || !InvalidTableIndex || !OversizedHeaderListError || !InvalidTableSizeError) {
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__hpack_core(void)
{
    if (huffman_build() < 0 || import_errors() < 0) {
        return NULL;
    }
    for (int64_t i = 0; i < STATIC_LENGTH; i++) {
        if (static_entries[i] == NULL) {
            static_entries[i] = Py_BuildValue("(yy)", STATIC_TABLE[i][0], STATIC_TABLE[i][1]);
            if (static_entries[i] == NULL) {
                return NULL;
            }
        }
    }
    if (PyType_Ready(&DecoderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(module, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
