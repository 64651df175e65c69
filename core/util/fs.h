// File helpers with the crash-safety ptk promises: atomic replace (temp file, fsync, rename,
// fsync of the folder). Not an mmap wrapper (see core/checkpoint).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace ptk {

// Whole file as bytes (a regular file only, see open_regular_file); throws ptk::Error naming the
// path and errno text.
std::string read_file(const std::string& path);

// Input files are regular files: a FIFO would block open() until a writer comes (forever), a folder
// reads as empty text, a device can stream without end. open_regular_file opens `path` read-only
// with O_NONBLOCK (which never blocks on a FIFO), checks the type with fstat, then clears
// O_NONBLOCK; it returns the descriptor (O_CLOEXEC) or throws ptk::Error naming the path:
//   "cannot open P: no such file", "cannot open P: is a directory, not a regular file",
//   "cannot open P: is a FIFO, not a regular file", "cannot open P: <errno text>".
int open_regular_file(const std::string& path);
// The same check by stat() for readers that open the file themselves (fopen, ifstream): call it
// right before their open. Symlinks are followed in both.
void check_regular_file(const std::string& path);

// Writes `data` to `path` atomically: a crash leaves either the old file or the new one.
void write_file_atomic(const std::string& path, std::string_view data);

// fsync a file or a folder by path (folders: makes a rename durable).
void fsync_path(const std::string& path);

// mkdir -p; throws on failure.
void make_dirs(const std::string& path);

bool path_exists(const std::string& path);

// Bytes of the regular files at or below `path` (apparent sizes, symlinks not followed); 0 when it
// is absent. Never throws.
uint64_t tree_bytes(const std::string& path);

// Best effort after a writer failed: removes its partial output `path` (a file or a folder) and
// says what happened, "removed its partial output X (1.2 GiB)" or "could not remove ... : why";
// "" when there is nothing at `path`. Never throws.
std::string remove_partial(const std::string& path);

// Folder of `path` ("." when none); `path` relative to `base_dir` unless absolute.
std::string parent_dir(const std::string& path);
std::string resolve_path(const std::string& base_dir, const std::string& path);

}  // namespace ptk
