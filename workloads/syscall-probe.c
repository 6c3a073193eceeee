/*
 * syscall-probe: make one system call that a seccomp profile may deny and
 * print "NAME errno=N (TEXT)" or "NAME ok". Used to tell a seccomp refusal
 * (the profile's EPERM) from what the kernel itself answers.
 *
 *   syscall-probe vmsplice      vmsplice(-1, NULL, 0, 0): EBADF unconfined, EPERM under the default profile
 *   syscall-probe personality   personality(ADDR_NO_RANDOMIZE): ok unconfined, ENOSYS under the profile
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long rc;

	if (argc != 2) {
		fprintf(stderr, "usage: syscall-probe vmsplice|personality\n");
		return 2;
	}
	if (strcmp(argv[1], "vmsplice") == 0) {
		rc = syscall(SYS_vmsplice, -1, NULL, 0, 0);
	} else if (strcmp(argv[1], "personality") == 0) {
		rc = syscall(SYS_personality, ADDR_NO_RANDOMIZE);
	} else {
		fprintf(stderr, "syscall-probe: unknown call %s\n", argv[1]);
		return 2;
	}
	if (rc < 0) {
		printf("%s errno=%d (%s)\n", argv[1], errno, strerror(errno));
		return 1;
	}
	printf("%s ok\n", argv[1]);
	return 0;
}
