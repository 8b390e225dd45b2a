/* A minimal C plugin for the end-to-end tests: an empty read-only root directory.
 * Compiled by the tests with -D switches to make it misbehave on purpose:
 *   PLUGIN_NAME "x"    name in the descriptor          (default "minimal")
 *   ABI_VERSION n      claimed ABI version             (default FSHOST_ABI_VERSION)
 *   STRUCT_SIZE n      claimed descriptor size         (default sizeof)
 *   LOAD_DELAY_MS n    on_load sleeps this long        (default 0)
 *   NO_ENTRY           export no fshost_plugin_entry at all
 *   V1_UPGRADE         export_state/import_state as ABI version 1 declared them
 */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "fshost_plugin.h"

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "minimal"
#endif
#ifndef ABI_VERSION
#define ABI_VERSION FSHOST_ABI_VERSION
#endif
#ifndef STRUCT_SIZE
#define STRUCT_SIZE sizeof(struct fshost_plugin)
#endif
#ifndef LOAD_DELAY_MS
#define LOAD_DELAY_MS 0
#endif

static int on_load(void) {
    struct timespec delay = {LOAD_DELAY_MS / 1000, (LOAD_DELAY_MS % 1000) * 1000000L};
    nanosleep(&delay, NULL);
    return 0;
}

static int lookup(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name,
                  struct fshost_attr *out) {
    (void)inst, (void)ctx, (void)parent, (void)name, (void)out;
    return ENOENT;
}

static int getattr(void *inst, fshost_ctx *ctx, uint64_t ino, struct fshost_attr *out) {
    (void)inst, (void)ctx;
    if (ino != 1) return ENOENT;
    memset(out, 0, sizeof *out);
    out->ino = 1;
    out->mode = S_IFDIR | 0555;
    out->nlink = 2;
    return 0;
}

#ifdef V1_UPGRADE
/* As a plugin built against ABI version 1 has them: no descriptor sharing. */
static int export_v1(void *inst, fshost_write_state write, void *write_buf) {
    (void)inst, (void)write, (void)write_buf;
    return 0;
}
static int import_v1(void *inst, const uint8_t *state, size_t size) {
    (void)inst, (void)state;
    return size == 0 ? 0 : EINVAL;
}
#endif

static const struct fshost_plugin plugin = {
    .magic = FSHOST_PLUGIN_MAGIC,
    .abi_version = ABI_VERSION,
    .struct_size = STRUCT_SIZE,
    .name = PLUGIN_NAME,
    .version = "1.0",
    .on_load = on_load,
    .lookup = lookup,
    .getattr = getattr,
#ifdef V1_UPGRADE
    .export_state = (void *)export_v1,
    .import_state = (void *)import_v1,
#endif
};

#ifndef NO_ENTRY
const struct fshost_plugin *fshost_plugin_entry(void) { return &plugin; }
#else
const struct fshost_plugin *not_the_entry(void) { return &plugin; }
#endif
