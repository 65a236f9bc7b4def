/*
 * C versions of the DER work on the hot path: TLV encoding (X.690 8.1: identifier, definite
 * length, contents), the walk over a PKCS #10 request (RFC 2986), the children of a SEQUENCE,
 * and the SubjectPublicKeyInfo slice of a certificate (RFC 5280 4.1). They are drop-in
 * replacements for pure-Python code in engine/_der.py, engine/request.py and
 * engine/certificate.py, which stay the reference: the tests check that both give the same
 * answers, and fail alike (same error, same message, same byte offset), on random and mutated
 * input. On this machine's CPython a bytecode costs ~100 machine instructions; these walks take
 * a few hundred bytecodes each in Python.
 *
 * Errors are raised as engine.errors.MalformedDerError(message, offset), and the request walk's
 * as its subclass MalformedRequestError(message, offset), like the Python code.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *malformed_error = NULL;

static PyObject *
raise_malformed(const char *message, Py_ssize_t offset)
{
    PyObject *error = PyObject_CallFunction(malformed_error, "sn", message, offset);
    if (error != NULL) {
        PyErr_SetObject(malformed_error, error);
        Py_DECREF(error);
    }
    return NULL;
}

/* Decode the header at `offset`; on success set *tag, *start, *end and return 0. */
static int
decode_header(const unsigned char *data, Py_ssize_t size, Py_ssize_t offset,
              int *tag, Py_ssize_t *start, Py_ssize_t *end)
{
    if (offset < 0 || offset + 2 > size) {
        raise_malformed("truncated element header", offset);
        return -1;
    }
    *tag = data[offset];
    if ((*tag & 0x1F) == 0x1F) {
        raise_malformed("multi-byte tags do not occur in these structures", offset);
        return -1;
    }
    unsigned int first = data[offset + 1];
    Py_ssize_t position = offset + 2;
    Py_ssize_t length;
    if (first < 0x80) {
        length = first;
    } else {
        unsigned int count = first & 0x7F;
        if (count == 0 || count > 4) {
            raise_malformed("indefinite or oversized length", offset);
            return -1;
        }
        if (position + (Py_ssize_t)count > size) {
            raise_malformed("truncated length", offset);
            return -1;
        }
        unsigned long long value = 0;
        for (unsigned int i = 0; i < count; i++) {
            value = (value << 8) | data[position + i];
        }
        if (value < 0x80 || data[position] == 0) {
            raise_malformed("length not in minimal form", offset);
            return -1;
        }
        position += count;
        length = (Py_ssize_t)value;
    }
    if (length > size - position) {
        raise_malformed("element runs past the end of its container", offset);
        return -1;
    }
    *start = position;
    *end = position + length;
    return 0;
}

static PyObject *
encode_tlv(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_tlv(tag, content)");
        return NULL;
    }
    long tag = PyLong_AsLong(args[0]);
    if (tag == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (tag < 0 || tag > 0xFF) {
        PyErr_SetString(PyExc_ValueError, "tag must fit one byte");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t length = view.len;
    unsigned char header[6];
    Py_ssize_t used = 0;
    header[used++] = (unsigned char)tag;
    if (length < 0x80) {
        header[used++] = (unsigned char)length;
    } else {
        unsigned char digits[4];
        int count = 0;
        Py_ssize_t rest = length;
        while (rest > 0 && count < 4) {
            digits[count++] = (unsigned char)(rest & 0xFF);
            rest >>= 8;
        }
        if (rest > 0) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_OverflowError, "content longer than 4 GiB");
            return NULL;
        }
        header[used++] = (unsigned char)(0x80 | count);
        while (count > 0) {
            header[used++] = digits[--count];
        }
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, used + length);
    if (result != NULL) {
        char *out = PyBytes_AS_STRING(result);
        memcpy(out, header, (size_t)used);
        memcpy(out + used, view.buf, (size_t)length);
    }
    PyBuffer_Release(&view);
    return result;
}


/* Read the element at *offset that must carry `tag` and end by `limit`; advance *offset past
 * it and return its content bounds. Mirrors engine._der.expect. */
static int
take(const unsigned char *data, Py_ssize_t size, Py_ssize_t *offset, int wanted,
     Py_ssize_t limit, Py_ssize_t *start, Py_ssize_t *end)
{
    int tag;
    if (decode_header(data, size, *offset, &tag, start, end) < 0) {
        return -1;
    }
    if (tag != wanted) {
        char message[64];
        snprintf(message, sizeof message, "expected tag 0x%02x, found 0x%02x", wanted, tag);
        raise_malformed(message, *offset);
        return -1;
    }
    if (*end > limit) {
        raise_malformed("element runs past the end of its container", *offset);
        return -1;
    }
    *offset = *end;
    return 0;
}

/* ---- The strict walk over a PKCS #10 request (RFC 2986 4.1, 4.2) under DER (X.690 10, 11) ----
 * Every element lies inside its container, every SEQUENCE and SET is consumed exactly, lengths
 * are definite and minimal, SET OF components are in DER order (X.690 11.6), and primitive
 * values of the universal types that occur here are checked (BOOLEAN, INTEGER, BIT STRING,
 * NULL, OBJECT IDENTIFIER, PrintableString, BMPString, UniversalString). engine/request.py has
 * the same walk in Python (`python_split_request`): both raise MalformedRequestError with the
 * same message at the same byte offset (tests/engine/test_request_strict.py). */

static PyObject *request_error = NULL;

static int
fail(const char *message, Py_ssize_t offset)
{
    PyObject *error = PyObject_CallFunction(request_error, "sn", message, offset);
    if (error != NULL) {
        PyErr_SetObject(request_error, error);
        Py_DECREF(error);
    }
    return -1;
}

/* The header at `offset`, which must lie with its content inside [.., limit). */
static int
tlv(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, int *tag, Py_ssize_t *start,
    Py_ssize_t *end)
{
    if (limit - offset < 2) {
        return fail("truncated element header", offset);
    }
    *tag = d[offset];
    if ((*tag & 0x1F) == 0x1F) {
        return fail("multi-byte tags do not occur in these structures", offset);
    }
    unsigned int first = d[offset + 1];
    Py_ssize_t position = offset + 2, length = first;
    if (first >= 0x80) {
        unsigned int count = first & 0x7F;
        if (count == 0 || count > 4) {
            return fail("indefinite or oversized length", offset);
        }
        if (limit - position < (Py_ssize_t)count) {
            return fail("truncated length", offset);
        }
        length = 0;
        for (unsigned int i = 0; i < count; i++) {
            length = (length << 8) | d[position + i];
        }
        if (length < 0x80 || d[position] == 0) {
            return fail("length not in minimal form", offset);
        }
        position += count;
    }
    if (length > limit - position) {
        return fail("element runs past the end of its container", offset);
    }
    *start = position;
    *end = position + length;
    return 0;
}

static int
want(const unsigned char *d, Py_ssize_t offset, int wanted, Py_ssize_t limit, Py_ssize_t *start,
     Py_ssize_t *end)
{
    int tag;
    if (tlv(d, offset, limit, &tag, start, end) < 0) {
        return -1;
    }
    if (tag != wanted) {
        char message[64];
        snprintf(message, sizeof message, "expected tag 0x%02x, found 0x%02x", wanted, tag);
        return fail(message, offset);
    }
    return 0;
}

/* OBJECT IDENTIFIER content (X.690 8.19): minimal subidentifiers, none cut short. Arcs below
 * 2**128 and at most 63 content bytes: cryptography's limits, so we accept nothing it refuses. */
static int
check_oid(const unsigned char *d, Py_ssize_t offset, Py_ssize_t start, Py_ssize_t end)
{
    if (end == start) {
        return fail("empty object identifier", offset);
    }
    if (end - start > 63) {
        return fail("object identifier longer than 63 bytes", offset);
    }
    /* Each subidentifier is checked where it ends (a byte without bit 8): minimal means it does
     * not start with 0x80; below 2**128 means at most 19 bytes, the first of 19 at most 0x83. */
    const unsigned char *arc = d + start, *stop = d + end;
    for (const unsigned char *p = arc; p < stop; p++) {
        if (*p & 0x80) {
            continue;
        }
        if (*arc == 0x80) {
            return fail("object identifier arc not minimal", offset);
        }
        if (p - arc >= 18 && (p - arc > 18 || *arc > 0x83)) {
            return fail("object identifier arc too large", offset);
        }
        arc = p + 1;
    }
    if (d[end - 1] & 0x80) {
        return fail("truncated object identifier", offset);
    }
    return 0;
}

static int
printable(unsigned char c)
{
    /* PrintableString (X.680 41.4): letters, digits, space and ' ( ) + , - . / : = ? */
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr(" '()+,-./:=?", c) != NULL);
}

/* Checks on one primitive value of a universal type (X.690 8, 10, 11). */
static int
check_primitive(const unsigned char *d, int tag, Py_ssize_t offset, Py_ssize_t start,
                Py_ssize_t end)
{
    Py_ssize_t length = end - start;
    switch (tag) {
    case 0x00:
        return fail("end-of-contents octets are not a value", offset);
    case 0x01:
        if (length != 1 || (d[start] != 0x00 && d[start] != 0xFF)) {
            return fail("BOOLEAN is not DER", offset);
        }
        return 0;
    case 0x02:
    case 0x0A:
        if (length == 0 || (length > 1 && ((d[start] == 0x00 && !(d[start + 1] & 0x80)) ||
                                           (d[start] == 0xFF && (d[start + 1] & 0x80))))) {
            return fail("INTEGER is empty or not minimal", offset);
        }
        return 0;
    case 0x03:
        if (length == 0 || d[start] > 7 || (length == 1 && d[start] != 0) ||
            (d[end - 1] & ((1 << d[start]) - 1))) {
            return fail("BIT STRING is not DER", offset);
        }
        return 0;
    case 0x05:
        if (length != 0) {
            return fail("NULL has content", offset);
        }
        return 0;
    case 0x06:
        return check_oid(d, offset, start, end);
    case 0x13:
        for (Py_ssize_t i = start; i < end; i++) {
            if (!printable(d[i])) {
                return fail("not a PrintableString character", offset);
            }
        }
        return 0;
    case 0x1C:
    case 0x1E:
        if (length % (tag == 0x1C ? 4 : 2)) {
            return fail("string is not a whole number of characters", offset);
        }
        return 0;
    default:
        return 0;
    }
}

/* Any one DER element at `offset` (an ANY: attribute values, algorithm parameters, extnValue
 * contents); set *after to its end. Constructed elements are walked down to 16 levels. */
static int
check_value(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, int depth,
            Py_ssize_t *after)
{
    int tag;
    Py_ssize_t start, end;
    if (tlv(d, offset, limit, &tag, &start, &end) < 0) {
        return -1;
    }
    if (tag & 0x20) {
        if ((tag & 0xC0) == 0 && tag != 0x30 && tag != 0x31) {
            return fail("constructed encoding of a primitive type", offset);
        }
        if (depth >= 16) {
            return fail("elements nested too deeply", offset);
        }
        Py_ssize_t cursor = start;
        while (cursor < end) {
            if (check_value(d, cursor, end, depth + 1, &cursor) < 0) {
                return -1;
            }
        }
    } else if ((tag & 0xC0) == 0 && check_primitive(d, tag, offset, start, end) < 0) {
        return -1;
    }
    *after = end;
    return 0;
}

/* DER orders SET OF components by their encodings (X.690 11.6); equal ones may repeat. */
static int
check_order(const unsigned char *d, Py_ssize_t previous, Py_ssize_t previous_end,
            Py_ssize_t current, Py_ssize_t current_end)
{
    Py_ssize_t a = previous_end - previous, b = current_end - current;
    int order = memcmp(d + previous, d + current, (size_t)(a < b ? a : b));
    if (order > 0 || (order == 0 && a > b)) {
        return fail("SET OF components not in DER order", current);
    }
    return 0;
}

/* An OBJECT IDENTIFIER element at `offset`; set *after to its end. */
static int
take_oid(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, Py_ssize_t *after)
{
    Py_ssize_t start;
    if (want(d, offset, 0x06, limit, &start, after) < 0) {
        return -1;
    }
    return check_oid(d, offset, start, *after);
}

/* Name ::= SEQUENCE OF RelativeDistinguishedName; RDN ::= SET SIZE (1..MAX) OF
 * AttributeTypeAndValue ::= SEQUENCE { type OID, value ANY } (RFC 5280 4.1.2.4). */
static int
walk_name(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, Py_ssize_t *after)
{
    Py_ssize_t start, end;
    if (want(d, offset, 0x30, limit, &start, &end) < 0) {
        return -1;
    }
    while (start < end) {
        Py_ssize_t set_start, set_end, previous = -1, previous_end = -1;
        if (want(d, start, 0x31, end, &set_start, &set_end) < 0) {
            return -1;
        }
        if (set_start == set_end) {
            return fail("empty RelativeDistinguishedName", start);
        }
        for (Py_ssize_t atv = set_start, content, stop, cursor; atv < set_end; atv = stop) {
            if (want(d, atv, 0x30, set_end, &content, &stop) < 0 ||
                take_oid(d, content, stop, &cursor) < 0 ||
                check_value(d, cursor, stop, 0, &cursor) < 0) {
                return -1;
            }
            if (cursor != stop) {
                return fail("trailing bytes in AttributeTypeAndValue", cursor);
            }
            if (previous >= 0 && check_order(d, previous, previous_end, atv, stop) < 0) {
                return -1;
            }
            previous = atv;
            previous_end = stop;
        }
        start = set_end;
    }
    *after = end;
    return 0;
}

/* AlgorithmIdentifier ::= SEQUENCE { algorithm OID, parameters ANY OPTIONAL } (RFC 5280 4.1.1.2) */
static int
walk_algorithm(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, Py_ssize_t *after)
{
    Py_ssize_t start, end, cursor;
    if (want(d, offset, 0x30, limit, &start, &end) < 0 || take_oid(d, start, end, &cursor) < 0) {
        return -1;
    }
    if (cursor < end && check_value(d, cursor, end, 0, &cursor) < 0) {
        return -1;
    }
    if (cursor != end) {
        return fail("trailing bytes in AlgorithmIdentifier", cursor);
    }
    *after = end;
    return 0;
}

static const unsigned char EXTENSION_REQUEST[] = {
    0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x0E};

/* Extensions ::= SEQUENCE SIZE (1..MAX) OF Extension; Extension ::= SEQUENCE { extnID OID,
 * critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING holding one DER element }
 * (RFC 5280 4.1, 4.2). DER omits a DEFAULT value (X.690 11.5), so critical is TRUE or absent. */
static int
walk_extensions(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, PyObject *into)
{
    Py_ssize_t start, end;
    if (want(d, offset, 0x30, limit, &start, &end) < 0) {
        return -1;
    }
    if (start == end) {
        return fail("extensionRequest holds no extensions", offset);
    }
    for (Py_ssize_t element = start, content, stop; element < end; element = stop) {
        Py_ssize_t oid_end, cursor, value_start, value_end, inner_end, flag_start, flag_end;
        if (want(d, element, 0x30, end, &content, &stop) < 0 ||
            take_oid(d, content, stop, &oid_end) < 0) {
            return -1;
        }
        cursor = oid_end;
        int critical = cursor < stop && d[cursor] == 0x01;
        if (critical) {
            if (want(d, cursor, 0x01, stop, &flag_start, &flag_end) < 0) {
                return -1;
            }
            if (flag_end - flag_start != 1 || d[flag_start] != 0xFF) {
                return fail("critical is not DER TRUE (FALSE is omitted)", cursor);
            }
            cursor = flag_end;
        }
        if (want(d, cursor, 0x04, stop, &value_start, &value_end) < 0) {
            return -1;
        }
        if (value_end != stop) {
            return fail("trailing bytes in Extension", value_end);
        }
        if (check_value(d, value_start, value_end, 0, &inner_end) < 0) {
            return -1;
        }
        if (inner_end != value_end) {
            return fail("trailing bytes in extnValue", inner_end);
        }
        PyObject *oid = PyBytes_FromStringAndSize((const char *)d + content, oid_end - content);
        if (oid == NULL) {
            return -1;
        }
        int present = PyDict_Contains(into, oid);
        if (present != 0) {
            Py_DECREF(oid);
            return present > 0 ? fail("extension appears twice", element) : -1;
        }
        PyObject *value = Py_BuildValue("(Oy#)", critical ? Py_True : Py_False,
                                        (const char *)d + value_start, value_end - value_start);
        int failed = value == NULL || PyDict_SetItem(into, oid, value) < 0;
        Py_XDECREF(value);
        Py_DECREF(oid);
        if (failed) {
            return -1;
        }
    }
    return 0;
}

/* Attribute ::= SEQUENCE { type OID, values SET SIZE (1..MAX) OF ANY } (RFC 2986 4.1). The
 * extensionRequest attribute is single-valued and appears at most once (RFC 2985 5.4.2). */
static int
walk_attribute(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, PyObject *into,
               int *seen)
{
    Py_ssize_t content, stop, oid_end, set_start, set_end;
    if (want(d, offset, 0x30, limit, &content, &stop) < 0 ||
        take_oid(d, content, stop, &oid_end) < 0 ||
        want(d, oid_end, 0x31, stop, &set_start, &set_end) < 0) {
        return -1;
    }
    if (set_end != stop) {
        return fail("trailing bytes after the attribute's values", set_end);
    }
    if (set_start == set_end) {
        return fail("attribute has no values", oid_end);
    }
    const Py_ssize_t marker = (Py_ssize_t)sizeof EXTENSION_REQUEST;
    if (oid_end - content == marker && memcmp(d + content, EXTENSION_REQUEST, marker) == 0) {
        if (*seen) {
            return fail("extensionRequest appears twice", offset);
        }
        *seen = 1;
        Py_ssize_t value_start, value_end;
        if (want(d, set_start, 0x30, set_end, &value_start, &value_end) < 0) {
            return -1;
        }
        if (value_end != set_end) {
            return fail("extensionRequest has more than one value", value_end);
        }
        return walk_extensions(d, set_start, set_end, into);
    }
    for (Py_ssize_t value = set_start, previous = -1, next; value < set_end; value = next) {
        if (check_value(d, value, set_end, 0, &next) < 0 ||
            (previous >= 0 && check_order(d, previous, value, value, next) < 0)) {
            return -1;
        }
        previous = value;
    }
    return 0;
}

/* attributes [0] IMPLICIT SET OF Attribute, content in [start, end), in DER order. */
static int
walk_attributes(const unsigned char *d, Py_ssize_t start, Py_ssize_t end, PyObject *into)
{
    int seen = 0;
    for (Py_ssize_t offset = start, previous = -1, stop, content; offset < end; offset = stop) {
        if (want(d, offset, 0x30, end, &content, &stop) < 0 ||
            walk_attribute(d, offset, end, into, &seen) < 0 ||
            (previous >= 0 && check_order(d, previous, offset, offset, stop) < 0)) {
            return -1;
        }
        previous = offset;
    }
    return 0;
}

/* SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT
 * STRING } (RFC 5280 4.1.2.7); keys are whole bytes. Sets the algorithm and key-bits bounds. */
static int
walk_spki(const unsigned char *d, Py_ssize_t offset, Py_ssize_t limit, Py_ssize_t *algorithm,
          Py_ssize_t *algorithm_end, Py_ssize_t *bits, Py_ssize_t *end)
{
    Py_ssize_t bits_end;
    if (want(d, offset, 0x30, limit, algorithm, end) < 0 ||
        walk_algorithm(d, *algorithm, *end, algorithm_end) < 0 ||
        want(d, *algorithm_end, 0x03, *end, bits, &bits_end) < 0) {
        return -1;
    }
    if (bits_end != *end) {
        return fail("trailing bytes in SubjectPublicKeyInfo", bits_end);
    }
    if (*bits == bits_end || d[*bits] != 0) {
        return fail("subjectPublicKey is not a whole-byte BIT STRING", *algorithm_end);
    }
    return 0;
}

static const unsigned char VERSION_1[] = {0x02, 0x01, 0x00};

/* parse_request(der) -> (info, subject, spki, spki_algorithm, key_bits, algorithm, signature,
 * extensions): the slices engine.request.parse_request needs (RFC 2986 4.1, 4.2). */
static PyObject *
parse_request(PyObject *module, PyObject *der)
{
    if (!PyBytes_Check(der)) {
        fail("request is not bytes", 0);
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(der);
    Py_ssize_t size = PyBytes_GET_SIZE(der);
    Py_ssize_t start, end, info_start, info_end, alg_end, sig_start, sig_end;
    if (want(d, 0, 0x30, size, &start, &end) < 0) {
        return NULL;
    }
    if (end != size) {
        fail("trailing bytes after the CertificationRequest", end);
        return NULL;
    }
    if (want(d, start, 0x30, end, &info_start, &info_end) < 0 ||
        walk_algorithm(d, info_end, end, &alg_end) < 0 ||
        want(d, alg_end, 0x03, end, &sig_start, &sig_end) < 0) {
        return NULL;
    }
    if (sig_end != end) {
        fail("trailing bytes in CertificationRequest", sig_end);
        return NULL;
    }
    if (sig_end == sig_start || d[sig_start] != 0) {
        fail("signature is not a whole-byte BIT STRING", alg_end);
        return NULL;
    }
    Py_ssize_t subject = info_start + 3, spki = 0, key_algorithm = 0, key_algorithm_end = 0;
    Py_ssize_t bits = 0, spki_end = 0, attrs = 0, attrs_end = 0;
    if (info_end - info_start < 3 || memcmp(d + info_start, VERSION_1, 3) != 0) {
        fail("request version is not v1(0)", info_start);
        return NULL;
    }
    if (walk_name(d, subject, info_end, &spki) < 0 ||
        walk_spki(d, spki, info_end, &key_algorithm, &key_algorithm_end, &bits, &spki_end) < 0 ||
        want(d, spki_end, 0xA0, info_end, &attrs, &attrs_end) < 0) {
        return NULL;
    }
    if (attrs_end != info_end) {
        fail("trailing bytes in CertificationRequestInfo", attrs_end);
        return NULL;
    }
    PyObject *extensions = PyDict_New();
    if (extensions == NULL) {
        return NULL;
    }
    if (walk_attributes(d, attrs, attrs_end, extensions) < 0) {
        Py_DECREF(extensions);
        return NULL;
    }
    const char *base = (const char *)d;
    return Py_BuildValue("(y#y#y#y#y#y#y#N)", base + start, info_end - start, base + subject,
                         spki - subject, base + spki, spki_end - spki, base + key_algorithm,
                         key_algorithm_end - key_algorithm, base + bits + 1, spki_end - bits - 1,
                         base + info_end, alg_end - info_end, base + sig_start + 1,
                         sig_end - sig_start - 1, extensions);
}

/* sequence_elements(data, tag) -> [bytes]: the child elements of the one element, carrying
 * `tag`, that fills `data` exactly. */
static PyObject *
sequence_elements(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "sequence_elements(data: bytes, tag: int)");
        return NULL;
    }
    long wanted = PyLong_AsLong(args[1]);
    if (wanted == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t offset = 0, start, end;
    if (take(data, size, &offset, (int)wanted, size, &start, &end) < 0) {
        return NULL;
    }
    if (end != size) {
        return raise_malformed("trailing bytes after the outer element", end);
    }
    PyObject *children = PyList_New(0);
    if (children == NULL) {
        return NULL;
    }
    while (start < end) {
        int tag;
        Py_ssize_t content, stop;
        if (decode_header(data, size, start, &tag, &content, &stop) < 0) {
            Py_DECREF(children);
            return NULL;
        }
        if (stop > end) {
            Py_DECREF(children);
            return raise_malformed("child runs past the end of its parent", start);
        }
        PyObject *child = PyBytes_FromStringAndSize((const char *)data + start, stop - start);
        if (child == NULL || PyList_Append(children, child) < 0) {
            Py_XDECREF(child);
            Py_DECREF(children);
            return NULL;
        }
        Py_DECREF(child);
        start = stop;
    }
    return children;
}

/* certificate_spki(der) -> bytes: the subjectPublicKeyInfo element of a certificate
 * (RFC 5280 4.1: tbsCertificate [0] version, serial, signature, issuer, validity, subject,
 * subjectPublicKeyInfo). */
static PyObject *
certificate_spki(PyObject *module, PyObject *der)
{
    if (!PyBytes_Check(der)) {
        PyErr_SetString(PyExc_TypeError, "certificate_spki(der: bytes)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(der);
    Py_ssize_t size = PyBytes_GET_SIZE(der);
    Py_ssize_t offset = 0, start, end, tbs_start, tbs_end;
    if (take(data, size, &offset, 0x30, size, &start, &end) < 0) {
        return NULL;
    }
    if (end != size) {
        return raise_malformed("trailing bytes after the outer element", end);
    }
    offset = start;
    if (take(data, size, &offset, 0x30, end, &tbs_start, &tbs_end) < 0) {
        return NULL;
    }
    offset = tbs_start;
    int count = offset < tbs_end && data[offset] == 0xA0 ? 6 : 5;
    for (int i = 0; i < count; i++) {
        int tag;
        Py_ssize_t content, stop;
        if (decode_header(data, size, offset, &tag, &content, &stop) < 0) {
            return NULL;
        }
        if (stop > tbs_end) {
            return raise_malformed("element runs past the end of its container", offset);
        }
        offset = stop;
    }
    Py_ssize_t spki_start = offset, content, spki_end;
    if (take(data, size, &offset, 0x30, tbs_end, &content, &spki_end) < 0) {
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)data + spki_start, spki_end - spki_start);
}

static PyMethodDef methods[] = {
    {"encode_tlv", (PyCFunction)(void (*)(void))encode_tlv, METH_FASTCALL,
     "encode_tlv(tag, content) -> bytes"},
    {"sequence_elements", (PyCFunction)(void (*)(void))sequence_elements, METH_FASTCALL,
     "sequence_elements(data, tag) -> the child elements of the element filling data"},
    {"certificate_spki", (PyCFunction)certificate_spki, METH_O,
     "certificate_spki(der) -> the subjectPublicKeyInfo of a certificate"},
    {"parse_request", (PyCFunction)parse_request, METH_O,
     "parse_request(der) -> the slices of a PKCS #10 request"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "engine._derc", "C versions of engine._der's hot primitives.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__derc(void)
{
    PyObject *errors = PyImport_ImportModule("engine.errors");
    if (errors == NULL) {
        return NULL;
    }
    malformed_error = PyObject_GetAttrString(errors, "MalformedDerError");
    request_error = PyObject_GetAttrString(errors, "MalformedRequestError");
    Py_DECREF(errors);
    if (malformed_error == NULL || request_error == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_definition);
}
