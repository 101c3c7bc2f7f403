/* tcpblast: the bench's TCP sender and receiver, one large write per call
 * so that the figure is the network path's and not UML's per-syscall cost.
 *
 *   tcpblast recv PORT             accept one connection, read to EOF,
 *                                  print "BYTES SECONDS GBITS"
 *   tcpblast send ADDR PORT MIB [CHUNK_KIB]   write MIB MiB in CHUNK_KIB chunks (default 1024)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "recv")) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (l < 0) die("socket");
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
        if (bind(l, (void *)&a, sizeof a) || listen(l, 1)) die("bind/listen");
        printf("listening\n");
        fflush(stdout);
        int c = accept(l, 0, 0);
        if (c < 0) die("accept");
        size_t sz = 4 << 20;
        char *buf = malloc(sz);
        unsigned long long total = 0;
        double t0 = 0;
        for (;;) {
            ssize_t n = read(c, buf, sz);
            if (n < 0) die("read");
            if (n == 0) break;
            if (!total) t0 = now();
            total += n;
        }
        double dt = now() - t0;
        printf("%llu %.3f %.2f\n", total, dt, total * 8 / dt / 1e9);
        return 0;
    }
    if (argc >= 5 && !strcmp(argv[1], "send")) {
        size_t chunk = (argc > 5 ? atoi(argv[5]) : 1024) * 1024UL;
        unsigned long long left = strtoull(argv[4], 0, 10) << 20;
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
        if (s < 0 || inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) die("address");
        if (connect(s, (void *)&a, sizeof a)) die("connect");
        char *buf = calloc(1, chunk);
        while (left) {
            size_t n = left < chunk ? left : chunk;
            ssize_t w = write(s, buf, n);
            if (w <= 0) die("write");
            left -= w;
        }
        close(s);
        return 0;
    }
    fprintf(stderr, "usage: tcpblast recv PORT | tcpblast send ADDR PORT MIB [CHUNK_KIB]\n");
    return 2;
}
