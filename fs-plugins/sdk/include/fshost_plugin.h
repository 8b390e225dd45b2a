/* fshost_plugin.h: the C ABI of fshost filesystem plugins (ABI version 1).
 *
 * A plugin is a shared object that exports one symbol:
 *
 *     const struct fshost_plugin *fshost_plugin_entry(void);
 *
 * returning a pointer to static data; it must do nothing else. Every operation
 * returns 0 or a positive errno; a NULL function pointer means "not supported"
 * (ENOSYS). New fields are only ever appended; the host treats fields beyond
 * struct_size as NULL. Mirrors fs-plugins/sdk/src/abi.rs (a test checks it).
 */
#ifndef FSHOST_PLUGIN_H
#define FSHOST_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FSHOST_PLUGIN_MAGIC 0x4c5054534f485346ULL /* "FSHOSTPL", little-endian */
#define FSHOST_ABI_VERSION 2u
#define FSHOST_PANICKED (-1) /* the plugin contained a crash: host answers EIO, taints it */

#define FSHOST_SET_MODE (1u << 0)
#define FSHOST_SET_UID (1u << 1)
#define FSHOST_SET_GID (1u << 2)
#define FSHOST_SET_SIZE (1u << 3)
#define FSHOST_SET_ATIME (1u << 4)
#define FSHOST_SET_MTIME (1u << 5)
#define FSHOST_SET_ATIME_NOW (1u << 6)
#define FSHOST_SET_MTIME_NOW (1u << 7)
#define FSHOST_SET_CTIME (1u << 8)
#define FSHOST_SET_FH (1u << 9)

struct fshost_context {
    uint32_t uid;
    uint32_t gid;
    uint32_t pid;
    uint32_t umask;
};

struct fshost_timespec {
    int64_t sec;
    uint32_t nsec;
    uint32_t reserved;
};

/* mode carries the file type bits (S_IFREG, S_IFDIR, ...) too. */
struct fshost_attr {
    uint64_t ino;
    uint64_t size;
    uint64_t blocks;
    struct fshost_timespec atime;
    struct fshost_timespec mtime;
    struct fshost_timespec ctime;
    uint32_t mode;
    uint32_t nlink;
    uint32_t uid;
    uint32_t gid;
    uint32_t rdev;
    uint32_t blksize;
};

struct fshost_setattr {
    uint32_t valid; /* FSHOST_SET_* */
    uint32_t mode;
    uint32_t uid;
    uint32_t gid;
    uint64_t size;
    struct fshost_timespec atime;
    struct fshost_timespec mtime;
    struct fshost_timespec ctime;
    uint64_t fh;
};

struct fshost_statfs {
    uint64_t blocks;
    uint64_t bfree;
    uint64_t bavail;
    uint64_t files;
    uint64_t ffree;
    uint32_t bsize;
    uint32_t namelen;
    uint32_t frsize;
    uint32_t reserved;
};

struct fshost_mount_option {
    const char *key;
    const char *value;
};

/* Adds one entry to a readdir reply; returns nonzero when the reply is full. */
typedef int (*fshost_fill_dir)(void *buf, uint64_t ino, uint64_t next_offset, uint32_t mode,
                               const char *name);

/* Appends bytes to the state export_state writes; returns nonzero (an errno) when the host
 * cannot take more. */
typedef int (*fshost_write_state)(void *buf, const uint8_t *data, size_t len);

/* Names an open descriptor of the instance in the state export_state writes: the host keeps
 * a duplicate (the instance keeps its own) and returns its index (>= 0; write that into the
 * state), or a negative errno. The state may go to another process: never write fd numbers. */
typedef int (*fshost_share_fd)(void *buf, int fd);

/* In import_state: the instance's own duplicate of the shared descriptor `index` (>= 0; the
 * instance owns and closes it), or a negative errno. */
typedef int (*fshost_take_fd)(void *fds, uint32_t index);

typedef const struct fshost_context fshost_ctx;

struct fshost_plugin {
    uint64_t magic;       /* FSHOST_PLUGIN_MAGIC */
    uint32_t abi_version; /* FSHOST_ABI_VERSION */
    uint32_t struct_size; /* sizeof(struct fshost_plugin) */
    const char *name;     /* a safe identifier: [a-z0-9_-]+ */
    const char *version;

    /* The plugin as a whole: run while Registering / Deregistering. */
    int (*on_load)(void);
    int (*on_unload)(void); /* the result only reports a contained crash */
    size_t (*last_panic)(char *buf, size_t cap);

    /* Per mount: make and free the instance handle every operation receives. */
    int (*create)(const struct fshost_mount_option *options, size_t count, void **instance);
    int (*destroy)(void *instance);

    /* Filesystem operations. */
    int (*lookup)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name,
                  struct fshost_attr *out);
    int (*forget)(void *inst, uint64_t ino, uint64_t nlookup);
    int (*getattr)(void *inst, fshost_ctx *ctx, uint64_t ino, struct fshost_attr *out);
    int (*setattr)(void *inst, fshost_ctx *ctx, uint64_t ino, const struct fshost_setattr *set,
                   struct fshost_attr *out);
    int (*readlink)(void *inst, fshost_ctx *ctx, uint64_t ino, uint8_t *buf, size_t cap,
                    size_t *len);
    int (*mknod)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name, uint32_t mode,
                 uint32_t rdev, struct fshost_attr *out);
    int (*mkdir)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name, uint32_t mode,
                 struct fshost_attr *out);
    int (*unlink)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name);
    int (*rmdir)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name);
    int (*symlink)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name,
                   const char *target, struct fshost_attr *out);
    int (*rename)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name,
                  uint64_t newparent, const char *newname, uint32_t flags);
    int (*link)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t newparent, const char *newname,
                struct fshost_attr *out);
    int (*open)(void *inst, fshost_ctx *ctx, uint64_t ino, int32_t flags, uint64_t *fh);
    int (*read)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, uint64_t offset,
                uint8_t *buf, size_t size, size_t *len);
    int (*write)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, uint64_t offset,
                 const uint8_t *data, size_t size, int32_t flags, size_t *written);
    int (*flush)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh);
    int (*release)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, int32_t flags);
    int (*fsync)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, int datasync);
    int (*opendir)(void *inst, fshost_ctx *ctx, uint64_t ino, int32_t flags, uint64_t *fh);
    int (*readdir)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, uint64_t offset,
                   fshost_fill_dir fill, void *fill_buf);
    int (*releasedir)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh);
    int (*statfs)(void *inst, fshost_ctx *ctx, uint64_t ino, struct fshost_statfs *out);
    int (*setxattr)(void *inst, fshost_ctx *ctx, uint64_t ino, const char *name,
                    const uint8_t *value, size_t size, int32_t flags);
    /* cap == 0 asks for the size only (*len); a too-small cap gives ERANGE. */
    int (*getxattr)(void *inst, fshost_ctx *ctx, uint64_t ino, const char *name, uint8_t *buf,
                    size_t cap, size_t *len);
    int (*listxattr)(void *inst, fshost_ctx *ctx, uint64_t ino, uint8_t *buf, size_t cap,
                     size_t *len);
    int (*removexattr)(void *inst, fshost_ctx *ctx, uint64_t ino, const char *name);
    int (*create_file)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name,
                       uint32_t mode, int32_t flags, struct fshost_attr *out, uint64_t *fh);

    /* ---- Appended after the first release; the host uses them only when struct_size
     * covers them (FSHOST_PASSTHROUGH_STRUCT_SIZE). ---- */

    /* FUSE passthrough: like open, and may also hand over an open fd of the backing file in
     * *backing_fd (or leave it at -1). The host owns that fd from then on; the kernel then
     * reads and writes the backing file directly, read/write stay the fallback. */
    int (*open_backing)(void *inst, fshost_ctx *ctx, uint64_t ino, int32_t flags, uint64_t *fh,
                        int *backing_fd);
    int (*create_backing)(void *inst, fshost_ctx *ctx, uint64_t parent, const char *name,
                          uint32_t mode, int32_t flags, struct fshost_attr *out, uint64_t *fh,
                          int *backing_fd);

    /* Upgrade (FSHOST_UPGRADE_STRUCT_SIZE): `fshostctl upgrade` pauses each mount, asks the
     * old instance to export_state (calling write as often as it likes) and a new instance,
     * fresh from create with the mount's options, to import_state what was written. Node
     * ids, file handles and directory offsets must survive. A stateless plugin sets both to
     * functions that write and accept nothing; left NULL, upgrades are refused. */
    int (*export_state)(void *inst, fshost_write_state write, fshost_share_fd share_fd,
                        void *write_buf);
    int (*import_state)(void *inst, const uint8_t *state, size_t size, fshost_take_fd take_fd,
                        void *fds);

    /* Space (FSHOST_SPACE_STRUCT_SIZE): fallocate(2) modes 0, FALLOC_FL_KEEP_SIZE and
     * FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE (others: EOPNOTSUPP); lseek answers
     * SEEK_DATA/SEEK_HOLE in *out (ENXIO at or past the end). NULL: ENOSYS, which the
     * kernel turns into "not supported" (fallocate) or "all data" (lseek). */
    int (*fallocate)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, uint64_t offset,
                     uint64_t length, int32_t mode);
    int (*lseek)(void *inst, fshost_ctx *ctx, uint64_t ino, uint64_t fh, uint64_t offset,
                 int32_t whence, uint64_t *out);

    /* Resume (FSHOST_RESUME_STRUCT_SIZE): called on an instance fresh from create that serves
     * a mount whose previous instance died with fshostd (systemd kept the FUSE connection);
     * the kernel will ask about node ids and handles this instance never gave out. Set it
     * only if the plugin can serve on without the lost process's memory (fixed or
     * reconstructible node ids); without it such mounts are detached after a crash. */
    int (*resume)(void *inst);

    /* Tmpfile (FSHOST_TMPFILE_STRUCT_SIZE): creates and opens an unnamed regular file in
     * parent (O_TMPFILE), answered as create_file; its link count is 0 until link names it.
     * NULL: the kernel answers EOPNOTSUPP. */
    int (*tmpfile)(void *inst, fshost_ctx *ctx, uint64_t parent, uint32_t mode, int32_t flags,
                   struct fshost_attr *out, uint64_t *fh);

    /* Wants (FSHOST_WANTS_STRUCT_SIZE): what this instance asks of the kernel when its mount
     * starts, FSHOST_WANT_* bits in *out. FSHOST_WANT_POSIX_ACL: the kernel enforces the
     * ACLs in system.posix_acl_access/_default and no longer applies the umask; mknod,
     * mkdir, create_file and tmpfile get the mode as asked and the umask in ctx->umask,
     * which the plugin applies unless the directory's default ACL replaces it. */
    int (*wants)(void *inst, uint64_t *out);

    /* Birth (FSHOST_BIRTH_STRUCT_SIZE): when ino was created, for statx's birth time. NULL:
     * the kernel reports none for the mount. */
    int (*birth_time)(void *inst, fshost_ctx *ctx, uint64_t ino, struct fshost_timespec *out);

    /* Flags (FSHOST_FLAGS_STRUCT_SIZE): the inode flags chattr(1) shows and sets (FS_*_FL).
     * set_flags runs after the kernel checked the caller may; refuse flags not kept with
     * EOPNOTSUPP. The kernel does not enforce append-only and immutable on FUSE: the host
     * refuses the opens they forbid, the plugin every other change. NULL: ENOTTY. */
    int (*get_flags)(void *inst, fshost_ctx *ctx, uint64_t ino, uint32_t *out);
    int (*set_flags)(void *inst, fshost_ctx *ctx, uint64_t ino, uint32_t flags);

    /* Tmpfile with passthrough (FSHOST_TMPFILE_BACKING_STRUCT_SIZE): tmpfile as open_backing
     * is to open. The kernel serves every open of a file the same way, so a plugin that
     * hands over backing files in open_backing must do it here too. */
    int (*tmpfile_backing)(void *inst, fshost_ctx *ctx, uint64_t parent, uint32_t mode,
                           int32_t flags, struct fshost_attr *out, uint64_t *fh, int *backing_fd);
};

/* The descriptor of the first release ends at create_file: a plugin built against it sets
 * struct_size to this and keeps loading. */
#define FSHOST_MIN_STRUCT_SIZE offsetof(struct fshost_plugin, open_backing)
#define FSHOST_PASSTHROUGH_STRUCT_SIZE offsetof(struct fshost_plugin, export_state)
#define FSHOST_UPGRADE_STRUCT_SIZE offsetof(struct fshost_plugin, fallocate)
#define FSHOST_SPACE_STRUCT_SIZE offsetof(struct fshost_plugin, resume)
#define FSHOST_RESUME_STRUCT_SIZE offsetof(struct fshost_plugin, tmpfile)
#define FSHOST_TMPFILE_STRUCT_SIZE offsetof(struct fshost_plugin, wants)
#define FSHOST_WANTS_STRUCT_SIZE offsetof(struct fshost_plugin, birth_time)
#define FSHOST_BIRTH_STRUCT_SIZE offsetof(struct fshost_plugin, get_flags)
#define FSHOST_FLAGS_STRUCT_SIZE offsetof(struct fshost_plugin, tmpfile_backing)
#define FSHOST_TMPFILE_BACKING_STRUCT_SIZE sizeof(struct fshost_plugin)

#define FSHOST_WANT_POSIX_ACL (1ull << 0)
/* The plugin clears setuid, and setgid if group-executable, itself: of a non-directory on a
 * change of owner or group; of a regular file on a truncation by a caller other than root
 * and on a setattr from such a caller that sets nothing but perhaps FSHOST_SET_FH (a write
 * that must drop them; root's writes send one for a file with capabilities, which the
 * kernel removes itself), where setgid without group execute goes too for a caller
 * outside the file's group. The kernel then stops asking for security.capability before
 * every write. */
#define FSHOST_WANT_KILL_PRIV (1ull << 1)

const struct fshost_plugin *fshost_plugin_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* FSHOST_PLUGIN_H */
