#!/usr/bin/env bash
# Only src/os may call the kernel. Fails, listing them, on global-scope system calls (::mmap(...),
# ::syscall(...)) or kernel/system-call headers anywhere else in src/ or include/.
set -u
root=${1:-.}
calls='(^|[^A-Za-z0-9_:>.])::(mmap|munmap|mremap|memfd_create|ftruncate|fcntl|syscall|socket|socketpair|sendmsg|recvmsg|sendto|recvfrom|connect|bind|listen|accept4?|epoll_[a-z_]+|close|read|write|readv|writev|fork|waitpid|kill|pipe2?|poll|ppoll|shutdown|sched_setaffinity|getpid|open|openat|sendfile|splice|ioctl|fstat|dup2?|dup3)[[:space:]]*\('
headers='#include[[:space:]]*<(sys/(mman|syscall|socket|epoll|wait|stat|un|uio|sendfile)\.h|linux/[a-z_]+\.h|unistd\.h|fcntl\.h|poll\.h)>'
hits=$(grep -rnE "$calls|$headers" "$root/src" "$root/include" --include='*.cc' --include='*.h' \
       | grep -v "^$root/src/os/")
if [ -n "$hits" ]; then
  echo "system calls outside src/os (route them through the os/ layer):"
  echo "$hits"
  exit 1
fi
echo "ok: no system calls outside src/os"
