/*
 * nsm-enclave-tool: the few things an enclave's shell scripts cannot do with busybox.
 *
 * Part of virtio-nsm (Apache-2.0). Compiled statically at cache-build time by
 * virtio_nsm.enclave.image; the sample enclave image carries the binary.
 *
 *   nsm-enclave-tool heartbeat [CID [PORT [TIMEOUT_MS]]]
 *       connect AF_VSOCK to CID:PORT (default 3:9000), write 0xB7, expect it echoed
 *   nsm-enclave-tool serve PORT CMD [ARG...]
 *       listen on vsock PORT; run CMD for each connection with the socket as stdin/stdout
 *   nsm-enclave-tool nsm-raw [DEVICE]
 *       read one CBOR request from stdin, send it through NSM_IOCTL_RAW on DEVICE
 *       (default /dev/nsm), write the CBOR response to stdout
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define HEARTBEAT_BYTE 0xB7
#define NSM_REQUEST_MAX 0x1000
#define NSM_RESPONSE_MAX 0x3000

struct nsm_iovec { uint64_t addr; uint64_t len; };
struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; };
/* Linux's include/uapi/linux/nsm.h: _IOWR(0x0A, 0, struct nsm_raw) */
#define NSM_IOCTL_RAW _IOWR(0x0A, 0, struct nsm_raw)

static int fail(const char *what) {
    fprintf(stderr, "nsm-enclave-tool: %s: %s\n", what, strerror(errno));
    return 1;
}

static int parse_uint(const char *s, unsigned long max, unsigned long *out) {
    char *end = NULL;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end != '\0' || v > max) {
        fprintf(stderr, "nsm-enclave-tool: not a number (0..%lu): %s\n", max, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* connect() with a deadline: vsock connects to a host that never answers can hang */
static int connect_timeout(int fd, const struct sockaddr_vm *sa, int timeout_ms) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    if (connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) < 0) {
        if (errno != EINPROGRESS)
            return -1;
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        int n = poll(&p, 1, timeout_ms);
        if (n == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (n < 0)
            return -1;
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            return -1;
        if (err) {
            errno = err;
            return -1;
        }
    }
    return fcntl(fd, F_SETFL, flags);
}

static int heartbeat(int argc, char **argv) {
    unsigned long cid = 3, port = 9000, timeout_ms = 20000;
    if ((argc > 0 && parse_uint(argv[0], UINT32_MAX, &cid) < 0) ||
        (argc > 1 && parse_uint(argv[1], UINT32_MAX, &port) < 0) ||
        (argc > 2 && parse_uint(argv[2], 3600000, &timeout_ms) < 0))
        return 2;
    struct sockaddr_vm sa;
    memset(&sa, 0, sizeof(sa));
    sa.svm_family = AF_VSOCK;
    sa.svm_cid = (unsigned int)cid;
    sa.svm_port = (unsigned int)port;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail("socket(AF_VSOCK)");
    if (connect_timeout(fd, &sa, (int)timeout_ms) < 0)
        return fail("heartbeat connect");
    unsigned char b = HEARTBEAT_BYTE;
    if (write(fd, &b, 1) != 1)
        return fail("heartbeat write");
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int n = poll(&p, 1, (int)timeout_ms);
    if (n <= 0) {
        if (n == 0)
            errno = ETIMEDOUT;
        return fail("heartbeat read");
    }
    ssize_t r = read(fd, &b, 1);
    if (r != 1) {
        if (r == 0)
            errno = ECONNRESET;
        return fail("heartbeat read");
    }
    if (b != HEARTBEAT_BYTE) {
        fprintf(stderr, "nsm-enclave-tool: heartbeat answered 0x%02x, not 0x%02x\n", b,
                HEARTBEAT_BYTE);
        return 1;
    }
    close(fd);
    return 0;
}

static int serve(int argc, char **argv) {
    unsigned long port;
    if (argc < 2) {
        fprintf(stderr, "usage: nsm-enclave-tool serve PORT CMD [ARG...]\n");
        return 2;
    }
    if (parse_uint(argv[0], UINT32_MAX, &port) < 0)
        return 2;
    struct sockaddr_vm sa;
    memset(&sa, 0, sizeof(sa));
    sa.svm_family = AF_VSOCK;
    sa.svm_cid = VMADDR_CID_ANY;
    sa.svm_port = (unsigned int)port;
    int lfd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        return fail("socket(AF_VSOCK)");
    if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        return fail("bind");
    if (listen(lfd, 16) < 0)
        return fail("listen");
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    fprintf(stderr, "nsm-enclave-tool: serving vsock port %lu\n", port);
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return fail("accept");
        }
        pid_t pid = fork();
        if (pid == 0) {
            if (dup2(c, 0) < 0 || dup2(c, 1) < 0)
                _exit(fail("dup2"));
            signal(SIGCHLD, SIG_DFL);
            execvp(argv[1], argv + 1);
            _exit(fail(argv[1]));
        }
        if (pid < 0)
            fail("fork");
        close(c);
    }
}

static int nsm_raw(int argc, char **argv) {
    const char *dev = argc > 0 ? argv[0] : "/dev/nsm";
    static unsigned char req[NSM_REQUEST_MAX + 1];
    static unsigned char resp[NSM_RESPONSE_MAX];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(0, req + len, sizeof(req) - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("read request");
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len > NSM_REQUEST_MAX) {
            fprintf(stderr, "nsm-enclave-tool: request longer than %d bytes\n", NSM_REQUEST_MAX);
            return 1;
        }
    }
    int fd = open(dev, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return fail(dev);
    struct nsm_raw raw = {
        .request = { (uint64_t)(uintptr_t)req, len },
        .response = { (uint64_t)(uintptr_t)resp, sizeof(resp) },
    };
    if (ioctl(fd, NSM_IOCTL_RAW, &raw) < 0)
        return fail("NSM_IOCTL_RAW");
    close(fd);
    size_t off = 0;
    while (off < raw.response.len) {
        ssize_t n = write(1, resp + off, raw.response.len - off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("write response");
        }
        off += (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "heartbeat") == 0)
        return heartbeat(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "serve") == 0)
        return serve(argc - 2, argv + 2);
    if (argc >= 2 && strcmp(argv[1], "nsm-raw") == 0)
        return nsm_raw(argc - 2, argv + 2);
    fprintf(stderr, "usage: nsm-enclave-tool heartbeat [CID [PORT [TIMEOUT_MS]]]\n"
                    "       nsm-enclave-tool serve PORT CMD [ARG...]\n"
                    "       nsm-enclave-tool nsm-raw [DEVICE]\n");
    return 2;
}
