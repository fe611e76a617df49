#!/usr/bin/env bash
# rss_baseline.sh: the memory floor of any program that links libvirt.
#
# Compiles a tiny C program against libvirt (pkg-config), and prints its own
# VmRSS, RssAnon and RssFile (/proc/self/status) and Pss (/proc/self/
# smaps_rollup) in two cases:
#   link-only  libvirt is linked and loaded, nothing of it is called;
#   test-xml   it opens libvirt's test driver (test:///default, in
#              libvirt0 itself, no daemon), looks up the domain "test" and
#              reads its XML, which is the least an agent over libvirt does.
# Each case runs RUNS times (default 5) and the median is printed, in MiB.
# bench/RESULTS.md ("RSS") compares the agent with these numbers.
#
#   bash bench/rss_baseline.sh [RUNS]
#
# Needs: cc, pkg-config, libvirt-dev (tests/lab/install-deps.sh installs it).
set -euo pipefail

runs=${1:-5}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "rss_baseline: RUNS must be a positive number" >&2; exit 1; }
command -v cc >/dev/null || { echo "rss_baseline: needs cc" >&2; exit 1; }
pkg-config --exists libvirt || { echo "rss_baseline: needs libvirt-dev (pkg-config libvirt)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/rss.c" <<'C'
#include <libvirt/libvirt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints "KEY kib" for the keys we want from one /proc/self file. */
static void grab(const char *path, const char *const *keys)
{
    char line[256];
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        exit(1);
    }
    while (fgets(line, sizeof line, f))
        for (const char *const *k = keys; *k; k++)
            if (strncmp(line, *k, strlen(*k)) == 0) {
                long kib = 0;
                sscanf(line + strlen(*k), "%ld", &kib);
                printf("%.*s %ld\n", (int)strlen(*k) - 1, *k, kib);
            }
    fclose(f);
}

int main(int argc, char **argv)
{
    /* Referenced but not called in link-only: the library is loaded (and
       its constructors run) even with --as-needed, and nothing more. */
    int (*version)(unsigned long *, const char *, unsigned long *) = virGetVersion;
    if (argc > 1 && strcmp(argv[1], "test-xml") == 0) {
        virConnectPtr c = virConnectOpen("test:///default");
        if (!c) {
            fprintf(stderr, "virConnectOpen(test:///default) failed\n");
            return 1;
        }
        virDomainPtr d = virDomainLookupByName(c, "test");
        char *xml = d ? virDomainGetXMLDesc(d, 0) : NULL;
        if (!xml) {
            fprintf(stderr, "reading the XML of domain 'test' failed\n");
            return 1;
        }
        /* Measured while the connection is open, as in an agent. */
        static const char *const st[] = {"VmRSS:", "RssAnon:", "RssFile:", NULL};
        static const char *const sr[] = {"Pss:", NULL};
        grab("/proc/self/status", st);
        grab("/proc/self/smaps_rollup", sr);
        free(xml);
        virDomainFree(d);
        virConnectClose(c);
        return 0;
    }
    static const char *const st[] = {"VmRSS:", "RssAnon:", "RssFile:", NULL};
    static const char *const sr[] = {"Pss:", NULL};
    grab("/proc/self/status", st);
    grab("/proc/self/smaps_rollup", sr);
    return version == NULL;
}
C

# shellcheck disable=SC2046 # pkg-config's flags are meant to split.
cc -O2 -o "$work/rss" "$work/rss.c" $(pkg-config --cflags --libs libvirt)

echo "libvirt $(pkg-config --modversion libvirt), $(uname -r), $runs runs per case, medians in MiB"
printf '%-10s %8s %8s %8s %8s\n' case VmRSS RssAnon RssFile Pss
for mode in link-only test-xml; do
    for ((i = 0; i < runs; i++)); do
        "$work/rss" "$mode" >"$work/$mode.$i"
    done
    row=$mode
    for key in VmRSS RssAnon RssFile Pss; do
        med=$(cat "$work/$mode".* | awk -v k="$key" '$1 == k { print $2 }' | sort -n |
            awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.1f", m / 1024 }')
        row+=$(printf ' %8s' "$med")
    done
    printf '%-10s%s\n' "$mode" "${row#"$mode"}"
done
