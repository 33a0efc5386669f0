/* A one-way delay line for the WAN emulator (tools/wan/link.py).
 *
 * netem is absent on this kernel, so the delay comes from NFQUEUE: an iptables rule in
 * the raw table queues every packet arriving on a veth end, and this program issues each
 * packet's ACCEPT verdict at its arrival + the delay, in arrival order. It reads packet
 * metadata only (NFQNL_COPY_META) and takes GSO packets whole (NFQA_CFG_F_GSO), so the
 * kernel never segments them for it. Delaying on ingress keeps held packets out of the
 * sender's TCP small-queue budget.
 *
 *   delayline QUEUE DELAY_US
 *
 * Runs until SIGTERM/SIGINT, then prints one JSON line of what it did to stdout: packets,
 * the most held at once, verdicts issued later than 1 ms past due, netlink overruns.
 * With --queue-bypass on the rule and NFQA_CFG_F_FAIL_OPEN, packets pass undelayed when
 * this program is not running or its queue is full (counted by the kernel, not here).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define RING (1u << 20) /* packets held at most: 1M (~16 GB of 16 KiB packets) */

static uint32_t ids[RING];
static uint64_t due[RING];
static uint64_t head, tail; /* ring indices: [head, tail) are held */
static uint64_t delay_ns, packets, max_held, late, overruns;
static volatile sig_atomic_t stop;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa,
                     void *data) {
    (void)msg;
    (void)data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (ph == NULL) return 0;
    uint32_t id = ntohl(ph->packet_id);
    if (tail - head == RING) { /* full: let it pass now rather than lose it */
        nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
        return 0;
    }
    ids[tail % RING] = id;
    due[tail % RING] = now_ns() + delay_ns;
    tail++;
    packets++;
    if (tail - head > max_held) max_held = tail - head;
    return 0;
}

/* Accept every packet now due with one batch verdict (ids rise in arrival order). */
static void release_due(struct nfq_q_handle *qh) {
    uint64_t t = now_ns();
    uint64_t last = head;
    while (last < tail && due[last % RING] <= t) {
        if (t - due[last % RING] > 1000000ull) late++;
        last++;
    }
    if (last > head) {
        nfq_set_verdict_batch(qh, ids[(last - 1) % RING], NF_ACCEPT);
        head = last;
    }
}

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s QUEUE DELAY_US\n", argv[0]);
        return 2;
    }
    int queue = atoi(argv[1]);
    delay_ns = strtoull(argv[2], NULL, 10) * 1000ull;
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    struct nfq_handle *h = nfq_open();
    if (h == NULL) {
        perror("nfq_open");
        return 1;
    }
    struct nfq_q_handle *qh = nfq_create_queue(h, (uint16_t)queue, &on_packet, NULL);
    if (qh == NULL) {
        perror("nfq_create_queue");
        return 1;
    }
    if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0) {
        perror("nfq_set_mode");
        return 1;
    }
    nfq_set_queue_maxlen(qh, RING);
    uint32_t flags = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN;
    if (nfq_set_queue_flags(qh, flags, flags) < 0) {
        perror("nfq_set_queue_flags");
        return 1;
    }
    nfnl_rcvbufsiz(nfq_nfnlh(h), 64u << 20);
    int fd = nfq_fd(h);
    printf("{\"ready\": true, \"queue\": %d, \"delay_us\": %llu}\n", queue,
           (unsigned long long)(delay_ns / 1000));
    fflush(stdout);

    static char buf[1 << 16];
    while (!stop) {
        uint64_t wait_ns = 50000000ull; /* nothing held: look at the signal flag at 20 Hz */
        if (head < tail) {
            uint64_t t = now_ns(), d = due[head % RING];
            wait_ns = d > t ? d - t : 0;
        }
        struct timespec ts = {(time_t)(wait_ns / 1000000000ull), (long)(wait_ns % 1000000000ull)};
        struct pollfd p = {fd, POLLIN, 0};
        int r = ppoll(&p, 1, &ts, NULL); /* wakes for a packet or the next one due */
        if (r > 0 && (p.revents & POLLIN)) {
            for (;;) {
                ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
                if (n < 0) {
                    if (errno == ENOBUFS) {
                        overruns++;
                        continue;
                    }
                    break; /* EAGAIN: drained */
                }
                nfq_handle_packet(h, buf, (int)n);
                release_due(qh);
            }
        }
        release_due(qh);
    }
    /* Let what is still held go, then say what happened. */
    if (head < tail) nfq_set_verdict_batch(qh, ids[(tail - 1) % RING], NF_ACCEPT);
    nfq_destroy_queue(qh);
    nfq_close(h);
    printf("{\"packets\": %llu, \"max_held\": %llu, \"late_1ms\": %llu, \"overruns\": %llu}\n",
           (unsigned long long)packets, (unsigned long long)max_held,
           (unsigned long long)late, (unsigned long long)overruns);
    return 0;
}
