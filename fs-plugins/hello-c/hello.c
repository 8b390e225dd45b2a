/* hello-c: the hellofs example written in C against fshost_plugin.h alone.
 * A read-only root directory with one file, `hello`. Build by hand with
 *     cc -shared -fPIC -I../sdk/include -o libhello_c.so hello.c
 * (the workspace build does it for you: see build.rs). */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "fshost_plugin.h"

#define ROOT 1
#define HELLO 2
static const char content[] = "Hello from C\n";

static int fill_attr(uint64_t ino, struct fshost_attr *out) {
    memset(out, 0, sizeof *out);
    out->ino = ino;
    out->blksize = 4096;
    if (ino == ROOT) {
        out->mode = S_IFDIR | 0555;
        out->nlink = 2;
    } else if (ino == HELLO) {
        out->mode = S_IFREG | 0444;
        out->nlink = 1;
        out->size = sizeof content - 1;
        out->blocks = 1;
    } else {
        return ENOENT;
    }
    return 0;
}

static int lookup(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name,
                  struct fshost_attr *out) {
    (void)inst, (void)ctx;
    if (parent == ROOT && strcmp(name, "hello") == 0) return fill_attr(HELLO, out);
    return ENOENT;
}

static int getattr(void *inst, fshost_ctx *ctx, uint64_t ino, struct fshost_attr *out) {
    (void)inst, (void)ctx;
    return fill_attr(ino, out);
}

static int read_file(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, uint64_t offset,
                     uint8_t *buf, size_t size, size_t *len) {
    (void)inst, (void)ctx, (void)fh;
    if (ino != HELLO) return EISDIR;
    size_t total = sizeof content - 1;
    size_t start = offset < total ? (size_t)offset : total;
    size_t n = total - start < size ? total - start : size;
    memcpy(buf, content + start, n);
    *len = n;
    return 0;
}

static int readdir(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, uint64_t offset,
                   fshost_fill_dir fill, void *fill_buf) {
    (void)inst, (void)ctx, (void)fh;
    if (ino != ROOT) return ENOTDIR;
    static const struct { uint64_t ino; uint32_t mode; const char *name; } entries[] = {
        {ROOT, S_IFDIR, "."}, {ROOT, S_IFDIR, ".."}, {HELLO, S_IFREG, "hello"}};
    for (uint64_t i = offset; i < sizeof entries / sizeof entries[0]; i++)
        if (fill(fill_buf, entries[i].ino, i + 1, entries[i].mode, entries[i].name)) break;
    return 0;
}

/* Stateless: an upgrade hands over nothing, and a new instance serves the same files. */
static int export_state(void *inst, fshost_write_state write, fshost_share_fd share_fd,
                        void *write_buf) {
    (void)inst, (void)write, (void)share_fd, (void)write_buf;
    return 0;
}

static int import_state(void *inst, const uint8_t *state, size_t size, fshost_take_fd take_fd,
                        void *fds) {
    (void)inst, (void)state, (void)take_fd, (void)fds;
    return size == 0 ? 0 : EINVAL;
}

/* Fixed node ids and no state: a new instance serves on after fshostd crashed. */
static int resume(void *inst) {
    (void)inst;
    return 0;
}

static const struct fshost_plugin plugin = {
    .magic = FSHOST_PLUGIN_MAGIC,
    .abi_version = FSHOST_ABI_VERSION,
    .struct_size = sizeof(struct fshost_plugin),
    .name = "hello-c",
    .version = "1.0.0",
    .lookup = lookup,
    .getattr = getattr,
    .read = read_file,
    .readdir = readdir,
    .export_state = export_state,
    .import_state = import_state,
    .resume = resume,
};

const struct fshost_plugin *fshost_plugin_entry(void) { return &plugin; }
