/* A stand-in for the CUDA driver (libcuda.so.1), for tests on machines without a GPU. stoker loads it when
 * STOKER_LIBCUDA names it (tests/test_cuda_driver.py compiles it with the system C compiler).
 *
 * It implements what stoker's driver layer resolves, with the driver's rules where stoker could get them
 * wrong: entry points are served through cuGetProcAddress only at an ABI version at least the one where their
 * current signature began (and not above the driver's version), every call but the queries needs cuInit first,
 * and memory, stream and event calls need a retained context current on the calling thread (else
 * CUDA_ERROR_INVALID_CONTEXT, counted as "bad_context"). Host memory is malloc'ed; "device" pointers are host
 * addresses, so a host-to-device copy is a memcpy.
 *
 * Streams run later, as a GPU's do: a copy is queued on its stream and its bytes are read from the source only
 * when the "device" gets to it, which is when an event recorded after it completes (cuEventSynchronize, or a
 * cuEventQuery that reports it done), when another stream is made to wait for such an event (the waiting
 * stream's later work, which the tests read from the host, must see the bytes), or when the stream is
 * destroyed. So a caller that reuses a source buffer before the copy's event has completed copies the new
 * bytes, as on a GPU, and a test comparing values sees it. An event reports NOT_READY at its first
 * STOKER_FAKE_CUDA_LAG (default 1) queries after a record, then completes (or once that many events have been
 * recorded after it: the fake's clock, so events age while others are queried). Freeing or unregistering host
 * memory that a queued copy still reads is counted ("freed_in_flight"; the copy is then run first). A copy
 * from pageable memory (neither a cuMemHostAlloc block nor a registered range) runs before the call returns,
 * as the driver's does ("pageable" counts them). A kernel launch runs at once, after the work queued before
 * it on its stream.
 *
 * STOKER_FAKE_CUDA picks the machine: "one" (default: one device), "two", "nodevice" (cuInit fails with
 * CUDA_ERROR_NO_DEVICE), "zero" (cuInit succeeds and no device is visible), "old" (a 10.2 driver), "oom"
 * (cuMemHostAlloc fails with CUDA_ERROR_OUT_OF_MEMORY), "noregister" (cuMemHostRegister fails so), "capture"
 * (a CUDA graph is being captured in the global mode all along: memory, stream and event calls fail with
 * CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, counted as "capture_refused", on a thread whose mode is not relaxed). Built
 * with -DFAKE_NO_PROC_ADDRESS it exports no cuGetProcAddress, as drivers before 11.3, and stoker falls back to
 * dlsym on the exported names.
 *
 * For the tests: fake_counter(name) reads a counter, fake_lookups() lists "name@version/flags" per
 * cuGetProcAddress call.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
  SUCCESS = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, NO_DEVICE = 100,
  INVALID_DEVICE = 101, INVALID_CONTEXT = 201, INVALID_HANDLE = 400, NOT_READY = 600,
  ALREADY_REGISTERED = 712, CAPTURE_UNSUPPORTED = 900,
};

#define EXPORT __attribute__((visibility("default")))

/* ---- machine and counters ---- */

static const char* mode(void) {
  const char* m = getenv("STOKER_FAKE_CUDA");
  return m && *m ? m : "one";
}
static int is(const char* m) { return strcmp(mode(), m) == 0; }
static int devices(void) { return is("two") ? 2 : (is("zero") || is("nodevice")) ? 0 : 1; }
/* CUDA 13.0 unless STOKER_FAKE_CUDA_VERSION says otherwise (as cuDriverGetVersion gives it: 12040 is 12.4). */
static int driver_version(void) {
  const char* v = getenv("STOKER_FAKE_CUDA_VERSION");
  return is("old") ? 10020 : (v && *v) ? atoi(v) : 13000;
}

enum { C_INIT, C_RETAIN, C_RELEASE, C_HOST_ALLOC, C_HOST_FREE, C_HOST_BYTES, C_REGISTER, C_UNREGISTER,
       C_STREAM_CREATE, C_STREAM_DESTROY, C_EVENT_CREATE, C_EVENT_DESTROY, C_COPY, C_WAIT, C_BAD_CONTEXT,
       C_BAD_HANDLE, C_SET_CURRENT, C_LAUNCH, C_FREED_IN_FLIGHT, C_PAGEABLE, C_REGISTERED_BYTES, C_CAPTURE_REFUSED, C_COUNT };
static const char* counter_names[C_COUNT] = {
  "init", "retain", "release", "host_alloc", "host_free", "host_bytes", "register", "unregister",
  "stream_create", "stream_destroy", "event_create", "event_destroy", "copy", "wait", "bad_context",
  "bad_handle", "set_current", "launch", "freed_in_flight", "pageable", "registered_bytes", "capture_refused"};
static long counters[C_COUNT];
static void bump(int c, long by) { __atomic_fetch_add(&counters[c], by, __ATOMIC_SEQ_CST); }

EXPORT long fake_counter(const char* name) {
  for (int i = 0; i < C_COUNT; ++i)
    if (strcmp(name, counter_names[i]) == 0) return __atomic_load_n(&counters[i], __ATOMIC_SEQ_CST);
  return -1;
}

static char lookups[8192];
EXPORT const char* fake_lookups(void) { return lookups; }

/* ---- state ---- */

static int initialised;
static long retained[2];                 /* primary-context reference counts per device */
static char contexts[2];                 /* a context handle is the address of its device's byte */
static __thread void* current;           /* the calling thread's current context */

static int context_ok(void) {
  if (!initialised) return 0;
  for (int d = 0; d < devices(); ++d)
    if (current == &contexts[d]) return __atomic_load_n(&retained[d], __ATOMIC_SEQ_CST) > 0;
  return 0;
}
/* The calling thread's stream-capture mode: 0 global (the default), 1 thread-local, 2 relaxed. */
static __thread int capture_mode;
/* Whether a call is refused on this thread as unsafe during a global capture ("capture": the fake treats
 * every memory, stream and event call so, stricter than the driver, which refuses some). */
static int capture_refuses(void) {
  if (!is("capture") || capture_mode == 2) return 0;
  bump(C_CAPTURE_REFUSED, 1);
  return 1;
}
EXPORT int fake_thread_capture_mode(void) { return capture_mode; }

#define NEED_CONTEXT()                 \
  do {                                 \
    if (!initialised) return NOT_INITIALIZED; \
    if (capture_refuses()) return CAPTURE_UNSUPPORTED; \
    if (!context_ok()) {               \
      bump(C_BAD_CONTEXT, 1);          \
      return INVALID_CONTEXT;          \
    }                                  \
  } while (0)

#define HANDLE_MAGIC 0x5a5a1234u
/* A queued copy: run when its stream gets to it. */
struct op { struct op* next; CUdeviceptr dst; const void* src; size_t bytes; long seq; };
/* kind 1: stream, 2: event, 3: module, 4+: kernel. A stream holds its queue (ops numbered from 0; `done` ran);
 * an event its stream and the number of ops queued there before its record, and its NOT_READY answers left. */
struct handle {
  unsigned magic; int kind; int pending;
  struct op* head; struct op* tail; long queued; long done; struct handle* next_stream; struct handle* prev_stream;
  struct handle* on; long seq; long born;
};
static pthread_mutex_t device_lock = PTHREAD_MUTEX_INITIALIZER;  /* the queues, events and registrations */
static struct handle legacy = {HANDLE_MAGIC, 1, 0, NULL, NULL, 0, 0, NULL, NULL, NULL, 0, 0};  /* stream 0 */
static long records;  /* events recorded so far: the fake's clock (under device_lock) */
static struct handle* streams = &legacy;  /* every live stream, the legacy one first */

static struct handle* new_handle(int kind) {
  struct handle* h = calloc(1, sizeof *h);
  if (h) { h->magic = HANDLE_MAGIC; h->kind = kind; }
  return h;
}
static int valid(void* p, int kind) {
  struct handle* h = p;
  if (h == NULL || h->magic != HANDLE_MAGIC || h->kind != kind) { bump(C_BAD_HANDLE, 1); return 0; }
  return 1;
}
static int lag(void) {
  const char* v = getenv("STOKER_FAKE_CUDA_LAG");
  return v && *v ? atoi(v) : 1;
}

/* Runs a stream's queued copies numbered below `seq`. Called with device_lock held. */
static void run_until(struct handle* q, long seq) {
  while (q->head && q->head->seq < seq) {
    struct op* o = q->head;
    memcpy((void*)(uintptr_t)o->dst, o->src, o->bytes);
    q->head = o->next;
    if (!q->head) q->tail = NULL;
    q->done = o->seq + 1;
    free(o);
  }
}

/* Host memory [p, p + bytes) stops being readable: queued copies from it are counted, then run. */
static void host_memory_gone(const void* p, size_t bytes) {
  const char* lo = p;
  const char* hi = lo + bytes;
  pthread_mutex_lock(&device_lock);
  for (struct handle* q = streams; q; q = q->next_stream) {
    long last = -1;
    for (struct op* o = q->head; o; o = o->next) {
      const char* s = o->src;
      if (o->bytes && s < hi && s + o->bytes > lo) last = o->seq;
    }
    if (last >= 0) { bump(C_FREED_IN_FLIGHT, 1); run_until(q, last + 1); }
  }
  pthread_mutex_unlock(&device_lock);
}

/* Page-locked host ranges: cuMemHostAlloc blocks (kind 1) and cuMemHostRegister ranges (kind 2). A copy from
 * anywhere else is from pageable memory, which the driver reads before the call returns. Under device_lock. */
struct range { const char* p; size_t bytes; int kind; };
static struct range* pinned_ranges;
static size_t pinned_count, pinned_capacity;

static int add_range(const void* p, size_t bytes, int kind) {
  if (pinned_count == pinned_capacity) {
    size_t cap = pinned_capacity ? 2 * pinned_capacity : 64;
    struct range* r = realloc(pinned_ranges, cap * sizeof *r);
    if (!r) return 0;
    pinned_ranges = r;
    pinned_capacity = cap;
  }
  pinned_ranges[pinned_count++] = (struct range){p, bytes, kind};
  return 1;
}
/* Removes the range starting at p of that kind; its size, or 0 when there is none. */
static size_t remove_range(const void* p, int kind) {
  for (size_t i = 0; i < pinned_count; ++i) {
    if (pinned_ranges[i].p == p && pinned_ranges[i].kind == kind) {
      size_t bytes = pinned_ranges[i].bytes;
      pinned_ranges[i] = pinned_ranges[--pinned_count];
      return bytes;
    }
  }
  return 0;
}
static int overlaps_pinned(const void* p, size_t bytes) {
  const char* c = p;
  for (size_t i = 0; i < pinned_count; ++i)
    if (c < pinned_ranges[i].p + pinned_ranges[i].bytes && pinned_ranges[i].p < c + bytes) return 1;
  return 0;
}
static int is_pinned(const void* p, size_t bytes) {
  const char* c = p;
  for (size_t i = 0; i < pinned_count; ++i)
    if (c >= pinned_ranges[i].p && c + bytes <= pinned_ranges[i].p + pinned_ranges[i].bytes) return 1;
  return 0;
}

/* ---- entry points ---- */

EXPORT CUresult cuDriverGetVersion(int* v) {
  if (!v) return INVALID_VALUE;
  *v = driver_version();
  return SUCCESS;
}

EXPORT CUresult cuInit(unsigned flags) {
  if (flags != 0) return INVALID_VALUE;
  bump(C_INIT, 1);
  if (is("nodevice")) return NO_DEVICE;
  initialised = 1;
  return SUCCESS;
}

EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
  const char* n = NULL;
  switch (e) {
    case SUCCESS: n = "CUDA_SUCCESS"; break;
    case INVALID_VALUE: n = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: n = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case NOT_INITIALIZED: n = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case NO_DEVICE: n = "CUDA_ERROR_NO_DEVICE"; break;
    case INVALID_DEVICE: n = "CUDA_ERROR_INVALID_DEVICE"; break;
    case INVALID_CONTEXT: n = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case INVALID_HANDLE: n = "CUDA_ERROR_INVALID_HANDLE"; break;
    case NOT_READY: n = "CUDA_ERROR_NOT_READY"; break;
    case ALREADY_REGISTERED: n = "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"; break;
    case CAPTURE_UNSUPPORTED: n = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
  }
  if (!s) return INVALID_VALUE;
  *s = n;
  return n ? SUCCESS : INVALID_VALUE;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
  const char* n = NULL;
  switch (e) {
    case NO_DEVICE: n = "no CUDA-capable device is detected (fake driver)"; break;
    case OUT_OF_MEMORY: n = "out of memory (fake driver)"; break;
    case INVALID_CONTEXT: n = "invalid device context (fake driver)"; break;
    default: if (cuGetErrorName(e, &n) == SUCCESS) n = "fake driver error"; break;
  }
  if (!s) return INVALID_VALUE;
  *s = n;
  return n ? SUCCESS : INVALID_VALUE;
}

EXPORT CUresult cuDeviceGetCount(int* n) {
  if (!initialised) return NOT_INITIALIZED;
  *n = devices();
  return SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (!initialised) return NOT_INITIALIZED;
  if (ordinal < 0 || ordinal >= devices()) return INVALID_DEVICE;
  *d = ordinal;
  return SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
  if (!initialised) return NOT_INITIALIZED;
  if (d < 0 || d >= devices()) return INVALID_DEVICE;
  __atomic_fetch_add(&retained[d], 1, __ATOMIC_SEQ_CST);
  bump(C_RETAIN, 1);
  *ctx = &contexts[d];
  return SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned* flags, int* active) {
  if (!initialised) return NOT_INITIALIZED;
  if (d < 0 || d >= devices() || !flags || !active) return INVALID_VALUE;
  *flags = 0;
  *active = __atomic_load_n(&retained[d], __ATOMIC_SEQ_CST) > 0;
  return SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
  if (!initialised) return NOT_INITIALIZED;
  if (d < 0 || d >= devices() || __atomic_load_n(&retained[d], __ATOMIC_SEQ_CST) <= 0) return INVALID_DEVICE;
  __atomic_fetch_sub(&retained[d], 1, __ATOMIC_SEQ_CST);
  bump(C_RELEASE, 1);
  return SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(void* ctx) {
  if (!initialised) return NOT_INITIALIZED;
  if (ctx != NULL && ctx != &contexts[0] && ctx != &contexts[1]) return INVALID_CONTEXT;
  bump(C_SET_CURRENT, 1);
  current = ctx;
  return SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(void** ctx) {
  if (!initialised) return NOT_INITIALIZED;
  *ctx = current;
  return SUCCESS;
}

/* Host memory: a page of header (magic and size) before the bytes handed out. */
#define PAGE 4096
#define ALLOC_MAGIC 0x70696e6e6564ull
EXPORT CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned flags) {
  NEED_CONTEXT();
  if (bytes == 0 || flags > 0xF) return INVALID_VALUE;
  if (is("oom")) return OUT_OF_MEMORY;
  unsigned char* raw = aligned_alloc(PAGE, PAGE + (bytes + PAGE - 1) / PAGE * PAGE);
  if (!raw) return OUT_OF_MEMORY;
  ((unsigned long long*)raw)[0] = ALLOC_MAGIC;
  ((unsigned long long*)raw)[1] = bytes;
  pthread_mutex_lock(&device_lock);
  int added = add_range(raw + PAGE, bytes, 1);
  pthread_mutex_unlock(&device_lock);
  if (!added) { free(raw); return OUT_OF_MEMORY; }
  bump(C_HOST_ALLOC, 1);
  bump(C_HOST_BYTES, (long)bytes);
  *p = raw + PAGE;
  return SUCCESS;
}

EXPORT CUresult cuMemFreeHost(void* p) {
  NEED_CONTEXT();
  if (!p) return INVALID_VALUE;
  unsigned char* raw = (unsigned char*)p - PAGE;
  if (((unsigned long long*)raw)[0] != ALLOC_MAGIC) { bump(C_BAD_HANDLE, 1); return INVALID_VALUE; }
  host_memory_gone(p, ((unsigned long long*)raw)[1]);
  pthread_mutex_lock(&device_lock);
  remove_range(p, 1);
  pthread_mutex_unlock(&device_lock);
  bump(C_HOST_FREE, 1);
  bump(C_HOST_BYTES, -(long)((unsigned long long*)raw)[1]);
  ((unsigned long long*)raw)[0] = 0;
  free(raw);
  return SUCCESS;
}

EXPORT CUresult cuMemHostRegister_v2(void* p, size_t bytes, unsigned flags) {
  NEED_CONTEXT();
  if (!p || bytes == 0 || flags > 0xF) return INVALID_VALUE;
  if (is("noregister")) return OUT_OF_MEMORY;
  pthread_mutex_lock(&device_lock);
  /* As the driver: a range overlapping one already page-locked is refused. */
  int overlap = overlaps_pinned(p, bytes);
  int added = !overlap && add_range(p, bytes, 2);
  pthread_mutex_unlock(&device_lock);
  if (overlap) return ALREADY_REGISTERED;
  if (!added) return OUT_OF_MEMORY;
  bump(C_REGISTER, 1);
  bump(C_REGISTERED_BYTES, (long)bytes);
  return SUCCESS;
}

EXPORT CUresult cuMemHostUnregister(void* p) {
  NEED_CONTEXT();
  if (!p) return INVALID_VALUE;
  pthread_mutex_lock(&device_lock);
  size_t bytes = remove_range(p, 2);
  pthread_mutex_unlock(&device_lock);
  if (bytes == 0) return INVALID_VALUE;  /* CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, as far as stoker can tell */
  host_memory_gone(p, bytes);
  bump(C_UNREGISTER, 1);
  bump(C_REGISTERED_BYTES, -(long)bytes);
  return SUCCESS;
}

EXPORT CUresult cuStreamCreate(void** s, unsigned flags) {
  NEED_CONTEXT();
  if (flags > 1) return INVALID_VALUE;
  struct handle* h = new_handle(1);
  pthread_mutex_lock(&device_lock);
  h->next_stream = legacy.next_stream;
  h->prev_stream = &legacy;
  if (legacy.next_stream) legacy.next_stream->prev_stream = h;
  legacy.next_stream = h;
  pthread_mutex_unlock(&device_lock);
  *s = h;
  bump(C_STREAM_CREATE, 1);
  return SUCCESS;
}

EXPORT CUresult cuStreamDestroy_v2(void* s) {
  NEED_CONTEXT();
  if (!valid(s, 1)) return INVALID_HANDLE;
  struct handle* h = s;
  pthread_mutex_lock(&device_lock);
  run_until(h, h->queued);  /* the work queued before a destroy still runs */
  h->prev_stream->next_stream = h->next_stream;
  if (h->next_stream) h->next_stream->prev_stream = h->prev_stream;
  pthread_mutex_unlock(&device_lock);
  h->magic = 0;  /* kept, not freed: an event recorded on it may still be queried */
  bump(C_STREAM_DESTROY, 1);
  return SUCCESS;
}

/* Stream 0 (the legacy default stream) is a valid stream argument. */
static int stream_ok(void* s) { return s == NULL || valid(s, 1); }
static struct handle* queue_of(void* s) { return s ? s : &legacy; }

EXPORT CUresult cuStreamWaitEvent(void* s, void* e, unsigned flags) {
  NEED_CONTEXT();
  if (!stream_ok(s) || !valid(e, 2) || flags != 0) return INVALID_HANDLE;
  struct handle* ev = e;
  pthread_mutex_lock(&device_lock);
  if (ev->on) run_until(ev->on, ev->seq);  /* the waiting stream's later work sees what the event covers */
  pthread_mutex_unlock(&device_lock);
  bump(C_WAIT, 1);
  return SUCCESS;
}

EXPORT CUresult cuEventCreate(void** e, unsigned flags) {
  NEED_CONTEXT();
  if (flags > 0xF) return INVALID_VALUE;
  *e = new_handle(2);
  bump(C_EVENT_CREATE, 1);
  return SUCCESS;
}

EXPORT CUresult cuEventRecord(void* e, void* s) {
  NEED_CONTEXT();
  if (!valid(e, 2) || !stream_ok(s)) return INVALID_HANDLE;
  struct handle* ev = e;
  pthread_mutex_lock(&device_lock);
  ev->on = queue_of(s);
  ev->seq = ev->on->queued;
  ev->pending = lag();
  ev->born = ++records;
  pthread_mutex_unlock(&device_lock);
  return SUCCESS;
}

EXPORT CUresult cuEventQuery(void* e) {
  NEED_CONTEXT();
  if (!valid(e, 2)) return INVALID_HANDLE;
  struct handle* h = e;
  CUresult r = SUCCESS;
  pthread_mutex_lock(&device_lock);
  if (h->pending > 0 && records - h->born < lag()) {  /* done after `lag` queries, or `lag` later records */
    --h->pending;
    r = NOT_READY;
  } else if (h->on) {
    run_until(h->on, h->seq);
  }
  pthread_mutex_unlock(&device_lock);
  return r;
}

EXPORT CUresult cuEventSynchronize(void* e) {
  NEED_CONTEXT();
  if (!valid(e, 2)) return INVALID_HANDLE;
  struct handle* h = e;
  pthread_mutex_lock(&device_lock);
  h->pending = 0;
  if (h->on) run_until(h->on, h->seq);
  pthread_mutex_unlock(&device_lock);
  return SUCCESS;
}

EXPORT CUresult cuEventDestroy_v2(void* e) {
  NEED_CONTEXT();
  if (!valid(e, 2)) return INVALID_HANDLE;
  ((struct handle*)e)->magic = 0;
  free(e);
  bump(C_EVENT_DESTROY, 1);
  return SUCCESS;
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* s) {
  NEED_CONTEXT();
  if (!stream_ok(s)) return INVALID_HANDLE;
  if (bytes && (!dst || !src)) return INVALID_VALUE;
  struct handle* q = queue_of(s);
  pthread_mutex_lock(&device_lock);
  if (bytes && !is_pinned(src, bytes)) {
    /* Pageable: the driver stages it before returning, after the stream's earlier work. */
    run_until(q, q->queued);
    memcpy((void*)(uintptr_t)dst, src, bytes);
    pthread_mutex_unlock(&device_lock);
    bump(C_COPY, 1);
    bump(C_PAGEABLE, 1);
    return SUCCESS;
  }
  struct op* o = malloc(sizeof *o);
  if (!o) { pthread_mutex_unlock(&device_lock); return OUT_OF_MEMORY; }
  o->next = NULL; o->dst = dst; o->src = src; o->bytes = bytes; o->seq = q->queued++;
  if (q->tail) q->tail->next = o; else q->head = o;
  q->tail = o;
  pthread_mutex_unlock(&device_lock);
  bump(C_COPY, 1);
  return SUCCESS;
}

/* ---- modules and kernels: stoker's normalise kernels, run on the host ---- */

/* The argument block of stoker's normalise kernels (csrc/stoker/device/normalize.cu). */
struct normalize_params {
  float mean[8];
  float std[8];
  float scale;
  int channels;
  int channels_last;
  long long plane;
  long long total;
};
static const char* kernel_names[3] = {"stoker_normalize_f32", "stoker_normalize_f16", "stoker_normalize_bf16"};

EXPORT CUresult cuModuleLoadData(void** module, const void* image) {
  NEED_CONTEXT();
  if (!module || !image) return INVALID_VALUE;
  *module = new_handle(3);
  return SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(void** fn, void* module, const char* name) {
  NEED_CONTEXT();
  if (!fn || !name || !valid(module, 3)) return INVALID_HANDLE;
  for (int k = 0; k < 3; ++k)
    if (strcmp(name, kernel_names[k]) == 0) { *fn = new_handle(4 + k); return SUCCESS; }
  return 500; /* CUDA_ERROR_NOT_FOUND */
}

static uint16_t to_bf16(float x) {  /* round to nearest even, as __float2bfloat16_rn (no NaN here) */
  uint32_t bits;
  memcpy(&bits, &x, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return (uint16_t)(bits >> 16);
}

EXPORT CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, void* s, void** params, void** extra) {
  NEED_CONTEXT();
  struct handle* h = f;
  if (!h || h->magic != HANDLE_MAGIC || h->kind < 4 || h->kind > 6 || !stream_ok(s)) return INVALID_HANDLE;
  if (!params || extra || gx == 0 || gy != 1 || gz != 1 || bx == 0 || by != 1 || bz != 1 || shared)
    return INVALID_VALUE;
  pthread_mutex_lock(&device_lock);
  run_until(queue_of(s), queue_of(s)->queued);  /* the work queued before the launch on its stream */
  pthread_mutex_unlock(&device_lock);
  const uint8_t* in = *(const uint8_t**)params[0];
  void* out = *(void**)params[1];
  const struct normalize_params* p = params[2];
  for (long long o = 0; o < p->total; ++o) {
    long long pixel = o % p->plane, nc = o / p->plane;
    int c = (int)(nc % p->channels);
    long long i = p->channels_last ? ((nc / p->channels) * p->plane + pixel) * p->channels + c : o;
    volatile float x = (float)in[i] * p->scale;  /* volatile: each step rounded, no contraction */
    x = x - p->mean[c];
    x = x / p->std[c];
    if (h->kind == 4) ((float*)out)[o] = x;
    else if (h->kind == 5) ((_Float16*)out)[o] = (_Float16)x;
    else ((uint16_t*)out)[o] = to_bf16(x);
  }
  bump(C_LAUNCH, 1);
  return SUCCESS;
}

/* ---- cuGetProcAddress ---- */

#ifndef FAKE_NO_PROC_ADDRESS
EXPORT CUresult cuThreadExchangeStreamCaptureMode(int* mode) {
  if (!mode || *mode < 0 || *mode > 2) return INVALID_VALUE;
  int previous = capture_mode;
  capture_mode = *mode;
  *mode = previous;
  return SUCCESS;
}

struct entry { const char* name; int since; void* fn; };
/* The version where each entry point's current signature and behaviour began. */
static const struct entry entries[] = {
  {"cuGetErrorName", 6000, (void*)cuGetErrorName},
  {"cuGetErrorString", 6000, (void*)cuGetErrorString},
  {"cuInit", 2000, (void*)cuInit},
  {"cuDriverGetVersion", 2020, (void*)cuDriverGetVersion},
  {"cuDeviceGetCount", 2000, (void*)cuDeviceGetCount},
  {"cuDeviceGet", 2000, (void*)cuDeviceGet},
  {"cuDevicePrimaryCtxRetain", 7000, (void*)cuDevicePrimaryCtxRetain},
  {"cuDevicePrimaryCtxRelease", 11000, (void*)cuDevicePrimaryCtxRelease_v2},
  {"cuDevicePrimaryCtxGetState", 7000, (void*)cuDevicePrimaryCtxGetState},
  {"cuCtxSetCurrent", 4000, (void*)cuCtxSetCurrent},
  {"cuCtxGetCurrent", 4000, (void*)cuCtxGetCurrent},
  {"cuMemHostAlloc", 2020, (void*)cuMemHostAlloc},
  {"cuMemFreeHost", 2000, (void*)cuMemFreeHost},
  {"cuMemHostRegister", 6050, (void*)cuMemHostRegister_v2},
  {"cuMemHostUnregister", 4000, (void*)cuMemHostUnregister},
  {"cuStreamCreate", 2000, (void*)cuStreamCreate},
  {"cuStreamDestroy", 4000, (void*)cuStreamDestroy_v2},
  {"cuStreamWaitEvent", 3020, (void*)cuStreamWaitEvent},
  {"cuEventCreate", 2000, (void*)cuEventCreate},
  {"cuEventRecord", 2000, (void*)cuEventRecord},
  {"cuEventQuery", 2000, (void*)cuEventQuery},
  {"cuEventSynchronize", 2000, (void*)cuEventSynchronize},
  {"cuEventDestroy", 4000, (void*)cuEventDestroy_v2},
  {"cuMemcpyHtoDAsync", 3020, (void*)cuMemcpyHtoDAsync_v2},
  {"cuModuleLoadData", 2000, (void*)cuModuleLoadData},
  {"cuModuleGetFunction", 2000, (void*)cuModuleGetFunction},
  {"cuLaunchKernel", 4000, (void*)cuLaunchKernel},
  {"cuThreadExchangeStreamCaptureMode", 10010, (void*)cuThreadExchangeStreamCaptureMode},
};

static CUresult lookup(const char* name, void** fn, int version, unsigned long long flags, int* status) {
  size_t used = strlen(lookups);
  if (used < sizeof lookups - 1)
    (void)!snprintf(lookups + used, sizeof lookups - used, "%s@%d/%llu;", name ? name : "?", version, flags);
  if (!name || !fn) return INVALID_VALUE;
  if (version > driver_version()) return INVALID_VALUE;
  *fn = NULL;
  if (status) *status = 1; /* symbol not found */
  for (size_t i = 0; i < sizeof entries / sizeof entries[0]; ++i) {
    if (strcmp(entries[i].name, name) != 0) continue;
    if (version < entries[i].since) {
      if (status) *status = 2; /* version not sufficient */
    } else {
      *fn = entries[i].fn;
      if (status) *status = 0;
    }
  }
  return SUCCESS;
}

EXPORT CUresult cuGetProcAddress(const char* name, void** fn, int version, unsigned long long flags) {
  return lookup(name, fn, version, flags, NULL);
}

EXPORT CUresult cuGetProcAddress_v2(const char* name, void** fn, int version, unsigned long long flags,
                                    int* status) {
  return lookup(name, fn, version, flags, status);
}
#endif
