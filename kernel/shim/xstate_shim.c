/*
 * umlctl xstate shim: LD_PRELOADed into UML kernels older than 6.13.
 *
 * Those kernels save and restore guest FP state with a fixed 2696-byte
 * PTRACE_GETREGSET/SETREGSET(NT_X86_XSTATE) buffer.  On hosts whose XSAVE area
 * is larger (AMX: 11008 bytes) the host truncates GET silently but refuses a
 * short SET with EFAULT, and the guest dies at init with "ptrace set fp regs
 * failed, errno = 14".  For a short SET we read the tracee's full state,
 * overlay the kernel's bytes (the legacy area, the XSAVE header and every
 * component the kernel knows about) and write the full size.  The components
 * beyond the kernel's buffer (AMX tile state) keep the tracee's current
 * values, which is correct as long as guest code does not use them.
 *
 * The UML kernel is single-threaded towards ptrace (one tracer), so one
 * static scratch buffer suffices; it must not live on the stack because UML
 * calls ptrace from its own small kernel stacks.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#define SHIM_BUF_SIZE (256 * 1024)

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace;
static unsigned char scratch[SHIM_BUF_SIZE] __attribute__((aligned(64)));

static ptrace_fn get_real(void)
{
	if (!real_ptrace)
		real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	return real_ptrace;
}

long ptrace(enum __ptrace_request request, ...)
{
	va_list ap;
	pid_t pid;
	void *addr, *data;
	ptrace_fn real = get_real();

	va_start(ap, request);
	pid = va_arg(ap, pid_t);
	addr = va_arg(ap, void *);
	data = va_arg(ap, void *);
	va_end(ap);

	if (!real) {
		errno = ENOSYS;
		return -1;
	}

	if ((int)request == PTRACE_SETREGSET &&
	    (unsigned long)addr == NT_X86_XSTATE && data != NULL) {
		struct iovec *iov = data;
		struct iovec full = { scratch, sizeof(scratch) };
		int saved = errno;

		if (iov->iov_len < sizeof(scratch) &&
		    real(PTRACE_GETREGSET, pid, addr, &full) == 0 &&
		    full.iov_len > iov->iov_len) {
			memcpy(scratch, iov->iov_base, iov->iov_len);
			errno = saved;
			return real(PTRACE_SETREGSET, pid, addr, &full);
		}
		errno = saved;
	}
	return real(request, pid, addr, data);
}
