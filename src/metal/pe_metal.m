/* The Metal host of pyeffort: pyeffort._metal, called through ctypes by pyeffort/metal.py.
 * The device, the kernels' library (the .metallib setup.py built with xcrun, or the sources
 * compiled at first use), one pipeline per kernel, buffers over host memory (unified memory: no
 * copies where alignment allows), and command buffers: a matmul encodes its kernels into the
 * open command buffer (kernel_select -> kernel_bucketmul_* -> kernel_reduce, no CPU wait in
 * between); pe_metal_commit ends it. With pe_metal_begin a decoding step keeps one command
 * buffer open for all its matmuls; without, every matmul commits its own.
 * Built and run only on macOS; this project has not run it on Apple hardware. Status codes as
 * src/cpu/pyeffort.h (pyeffort.errors), PE_ERR_DEVICE with pe_metal_error()'s message. */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <unistd.h>

#include "pe_metal_host.h"

enum { PE_OK = 0, PE_ERR_ALLOC = 1, PE_ERR_ARG = 3, PE_ERR_DEVICE = 1000 };

typedef struct pe_metal_matrix { /* buffers from pe_metal_buffer_*; scales, srow: q8 only */
    void *values;                /* (n_rows, G) fp16 or int8 */
    void *positions;             /* (n_rows, ceil(G / 2)) u8 */
    void *stats;                 /* (n_rows,) f32, row order */
    void *order;                 /* (n_rows,) i32, row order */
    void *scales;                /* (scale_rows, ceil(G / 4)) fp16, or NULL */
    void *srow;                  /* (n_rows,) u32: the row of scales of each row, or NULL */
    uint32_t n_in, n_out, n_rows;
} pe_metal_matrix;

typedef struct pe_metal_scratch { /* per matrix and token count, from pe_metal_buffer_new */
    void *keys, *rows;            /* (n_tok, n_rows) u32 */
    void *info;                   /* (n_tok, PE_INFO_WORDS) u32 */
    void *partial;                /* (n_tok, n_splits, n_out) f32 */
} pe_metal_scratch;

static id<MTLDevice> g_dev;
static id<MTLCommandQueue> g_queue;
static id<MTLLibrary> g_lib;
static NSMutableDictionary<NSString *, id<MTLComputePipelineState>> *g_pipes;
static id<MTLCommandBuffer> g_open; /* being encoded */
static id<MTLCommandBuffer> g_last; /* the last committed */
static int g_token;                 /* pe_metal_begin: matmuls leave g_open open */
static char g_error[2048];
static char g_name[256]; /* the device's name */

static int fail(int status, NSString *msg) {
    snprintf(g_error, sizeof g_error, "%s", msg.UTF8String ? msg.UTF8String : "?");
    return status;
}

const char *pe_metal_error(void) { return g_error; }

const char *pe_metal_device_name(void) { return g_dev ? g_name : NULL; }

/* The device, its queue and the kernels: the library at lib_path if it exists, else `source`
 * (every .metal with pe_metal.h inlined) compiled now, without fast math (the cutoff's float
 * products must be the reference's). Idempotent. */
int pe_metal_init(const char *lib_path, const char *source) {
    @autoreleasepool {
        if (g_dev) return PE_OK;
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        if (!dev) return fail(PE_ERR_DEVICE, @"no Metal device on this machine");
        NSError *err = nil;
        id<MTLLibrary> lib = nil;
        if (lib_path && access(lib_path, R_OK) == 0) {
            lib = [dev newLibraryWithURL:[NSURL fileURLWithPath:@(lib_path)] error:&err];
        } else if (source) {
            MTLCompileOptions *opt = [MTLCompileOptions new];
            opt.fastMathEnabled = NO;
            lib = [dev newLibraryWithSource:@(source) options:opt error:&err];
        }
        if (!lib) return fail(PE_ERR_DEVICE, err ? err.localizedDescription : @"no kernels");
        g_dev = dev, g_queue = [dev newCommandQueue], g_lib = lib;
        snprintf(g_name, sizeof g_name, "%s", dev.name.UTF8String ? dev.name.UTF8String : "?");
        g_pipes = [NSMutableDictionary new];
        return g_queue ? PE_OK : fail(PE_ERR_DEVICE, @"no command queue");
    }
}

/* The pipeline of kernel `name` (a host_name of the .metal files), made once. */
static id<MTLComputePipelineState> pipeline(NSString *name) {
    id<MTLComputePipelineState> p = g_pipes[name];
    if (p) return p;
    id<MTLFunction> fn = [g_lib newFunctionWithName:name];
    NSError *err = nil;
    p = fn ? [g_dev newComputePipelineStateWithFunction:fn error:&err] : nil;
    if (!p) fail(PE_ERR_DEVICE, err ? err.localizedDescription : [@"no kernel " stringByAppendingString:name]);
    else g_pipes[name] = p;
    return p;
}

/* Threads per threadgroup of kernel_select: 1024, or fewer where the device allows fewer. */
uint32_t pe_metal_select_threads(void) {
    id<MTLComputePipelineState> p = pipeline(@"kernel_select_f32");
    const NSUInteger n = p ? MIN((NSUInteger)PE_SELECT_MAX_THREADS, p.maxTotalThreadsPerThreadgroup) : 0;
    return (uint32_t)(n / 32 * 32);
}

/* ------------------------------------------------------------ buffers (shared storage) */

/* A buffer over host memory [ptr, ptr + len): without a copy where ptr is page-aligned and len
 * a multiple of the page size (a memory-mapped file; the caller keeps it alive), else a copy
 * (*copied = 1). NULL on failure. */
void *pe_metal_buffer_wrap(const void *ptr, size_t len, int *copied) {
    const size_t page = (size_t)getpagesize();
    id<MTLBuffer> b = nil;
    *copied = 0;
    if (!g_dev) return NULL;
    if (len && (uintptr_t)ptr % page == 0 && len % page == 0)
        b = [g_dev newBufferWithBytesNoCopy:(void *)ptr length:len
                                    options:MTLResourceStorageModeShared deallocator:nil];
    if (!b) {
        b = [g_dev newBufferWithBytes:ptr length:(len ? len : 4) options:MTLResourceStorageModeShared];
        *copied = 1;
    }
    return b ? (__bridge_retained void *)b : NULL;
}

void *pe_metal_buffer_new(size_t len) {
    if (!g_dev) return NULL;
    id<MTLBuffer> b = [g_dev newBufferWithLength:(len ? len : 4) options:MTLResourceStorageModeShared];
    return b ? (__bridge_retained void *)b : NULL;
}

void *pe_metal_buffer_contents(void *buf) { return ((__bridge id<MTLBuffer>)buf).contents; }

void pe_metal_buffer_free(void *buf) {
    if (buf) CFBridgingRelease(buf);
}

/* ------------------------------------------------------------ command buffers */

static id<MTLComputeCommandEncoder> encoder(void) {
    if (!g_open) g_open = [g_queue commandBuffer];
    return [g_open computeCommandEncoder]; /* serial: each dispatch sees the previous' writes */
}

/* Commits the open command buffer (if any); wait: until it and every earlier one are done. */
int pe_metal_commit(int wait) {
    if (g_open) {
        [g_open commit];
        g_last = g_open, g_open = nil;
    }
    if (wait && g_last) {
        [g_last waitUntilCompleted];
        if (g_last.status == MTLCommandBufferStatusError)
            return fail(PE_ERR_DEVICE, g_last.error.localizedDescription);
    }
    return PE_OK;
}

/* A decoding step: the matmuls until pe_metal_end go into one command buffer. */
void pe_metal_begin(void) { g_token = 1; }

int pe_metal_end(int wait) {
    g_token = 0;
    return pe_metal_commit(wait);
}

static int finish(id<MTLComputeCommandEncoder> enc) {
    [enc endEncoding];
    return g_token ? PE_OK : pe_metal_commit(0);
}

#define BUF(p) ((__bridge id<MTLBuffer>)(p))

/* Binds buffers bufs[0..n) at indices first.. of enc. */
static void bind(id<MTLComputeCommandEncoder> enc, NSUInteger first, void *const *bufs, int n) {
    for (int i = 0; i < n; i++) [enc setBuffer:BUF(bufs[i]) offset:0 atIndex:first + i];
}

/* x (n_tok, n_in) fp32/fp16 @ m at `effort` -> y (n_tok, n_out) fp32/fp16, encoded: the
 * cutoff search, the matmul on the dispatched rows (n_splits shares), the reduce. */
int pe_metal_effort(const pe_metal_matrix *m, void *x, int x_half, uint32_t n_tok, double effort,
                    void *y, int y_half, const pe_metal_scratch *s, uint32_t n_splits) {
    @autoreleasepool {
        const pe_metal_params p =
            pe_metal_effort_params(m->n_in, m->n_out, m->n_rows, n_tok, effort, n_splits);
        const int q8 = m->scales != NULL;
        NSString *xs = x_half ? @"f16" : @"f32";
        id<MTLComputePipelineState> sel = pipeline([@"kernel_select_" stringByAppendingString:xs]);
        id<MTLComputePipelineState> mm = pipeline([NSString stringWithFormat:@"kernel_bucketmul_%@_%@",
                                                                             q8 ? @"q8" : @"f16", xs]);
        id<MTLComputePipelineState> red = pipeline(y_half ? @"kernel_reduce_f16" : @"kernel_reduce_f32");
        const uint32_t nt = pe_metal_select_threads();
        if (!sel || !mm || !red || nt == 0) return PE_ERR_DEVICE;
        if (n_tok == 0 || n_splits == 0) return n_tok == 0 ? PE_OK : PE_ERR_ARG;
        id<MTLComputeCommandEncoder> enc = encoder();
        [enc setComputePipelineState:sel];
        bind(enc, 0, (void *[]){x, m->stats, m->order}, 3);
        [enc setBytes:&p length:sizeof p atIndex:3];
        bind(enc, 4, (void *[]){s->keys, s->rows, s->info}, 3);
        [enc dispatchThreadgroups:MTLSizeMake(n_tok, 1, 1) threadsPerThreadgroup:MTLSizeMake(nt, 1, 1)];

        [enc setComputePipelineState:mm];
        bind(enc, 0, (void *[]){x, m->values, m->positions, m->order}, 4);
        [enc setBytes:&p length:sizeof p atIndex:4];
        bind(enc, 5, (void *[]){s->rows, s->info, s->partial}, 3);
        if (q8) bind(enc, 8, (void *[]){m->scales, m->srow}, 2);
        [enc dispatchThreadgroups:MTLSizeMake(p.n_tiles, n_splits, n_tok)
            threadsPerThreadgroup:MTLSizeMake(PE_MM_THREADS, 1, 1)];

        [enc setComputePipelineState:red];
        bind(enc, 0, (void *[]){s->partial, y}, 2);
        [enc setBytes:&p length:sizeof p atIndex:2];
        [enc dispatchThreadgroups:MTLSizeMake(pe_metal_reduce_groups(&p), 1, 1)
            threadsPerThreadgroup:MTLSizeMake(PE_REDUCE_THREADS, 1, 1)];
        return finish(enc);
    }
}

/* x (n_tok, n_in) @ w (n_in, n_out) fp16 -> y, encoded: the dense kernel over n_splits shares
 * of the inputs (partial (n_tok, n_splits, n_out) f32), the reduce. */
int pe_metal_dense(void *w, uint32_t n_in, uint32_t n_out, void *x, int x_half, uint32_t n_tok,
                   void *y, int y_half, void *partial, uint32_t n_splits) {
    @autoreleasepool {
        const pe_metal_params p = pe_metal_dense_params(n_in, n_out, n_tok, n_splits);
        id<MTLComputePipelineState> mm = pipeline(x_half ? @"kernel_dense_f16_f16" : @"kernel_dense_f16_f32");
        id<MTLComputePipelineState> red = pipeline(y_half ? @"kernel_reduce_f16" : @"kernel_reduce_f32");
        if (!mm || !red) return PE_ERR_DEVICE;
        if (n_tok == 0 || n_splits == 0) return n_tok == 0 ? PE_OK : PE_ERR_ARG;
        id<MTLComputeCommandEncoder> enc = encoder();
        [enc setComputePipelineState:mm];
        bind(enc, 0, (void *[]){x, w}, 2);
        [enc setBytes:&p length:sizeof p atIndex:2];
        bind(enc, 3, (void *[]){partial}, 1);
        [enc dispatchThreadgroups:MTLSizeMake(p.n_tiles, n_splits, n_tok)
            threadsPerThreadgroup:MTLSizeMake(PE_MM_THREADS, 1, 1)];
        [enc setComputePipelineState:red];
        bind(enc, 0, (void *[]){partial, y}, 2);
        [enc setBytes:&p length:sizeof p atIndex:2];
        [enc dispatchThreadgroups:MTLSizeMake(pe_metal_reduce_groups(&p), 1, 1)
            threadsPerThreadgroup:MTLSizeMake(PE_REDUCE_THREADS, 1, 1)];
        return finish(enc);
    }
}

/* ------------------------------------------------------------ the module */

static struct PyModuleDef pe_metal_module = {
    PyModuleDef_HEAD_INIT, "_metal",
    "The Metal host's C functions (pe_metal_*), called through ctypes by pyeffort.metal.", -1, NULL};

PyMODINIT_FUNC PyInit__metal(void) { return PyModule_Create(&pe_metal_module); }
