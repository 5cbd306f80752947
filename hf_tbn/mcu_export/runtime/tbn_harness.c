/* Test harness of an exported model, the same source for the host and the board.
 *
 * Reads tbn_inputs.bin (uint32 count, then count * TBN_HARNESS_IN float32), runs the model
 * on each input and writes tbn_outputs.bin (count * TBN_HARNESS_OUT float32). On the board
 * the files go through semihosting, and each inference is timed with SysTick (wraps after
 * 2^24 ticks, far beyond one inference of a model this runtime targets); a calibration
 * loop of a known instruction count is timed too, so the host can convert ticks to
 * instructions (qemu -icount shift=0 advances SysTick by instructions executed).
 * Build with -DTBN_HARNESS_HEADER='"model.h"', TBN_HARNESS_RUN, _IN and _OUT.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include TBN_HARNESS_HEADER

#if defined(__arm__)
#define TBN_SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define TBN_SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define TBN_SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define TBN_CALIBRATION_LOOPS 100000u /* two instructions per iteration */

/* SysTick runs freely (24-bit down counter); an interval is the difference of two reads. */
static void tick_init(void) {
    TBN_SYST_RVR = 0x00FFFFFFu;
    TBN_SYST_CVR = 0;
    TBN_SYST_CSR = 5u; /* enable, processor clock, no interrupt */
    while (TBN_SYST_CVR == 0) {
    }
}

static uint32_t tick_since(uint32_t start) {
    return (start - TBN_SYST_CVR) & 0x00FFFFFFu;
}

static uint32_t calibrate(void) {
    uint32_t n = TBN_CALIBRATION_LOOPS;
    const uint32_t start = TBN_SYST_CVR;
    __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(n) : : "cc");
    return tick_since(start);
}
#endif

static float in_buf[TBN_HARNESS_IN];
static float out_buf[TBN_HARNESS_OUT];

int main(void) {
    uint32_t count, k;
#if defined(__arm__)
    uint32_t start, ticks, ticks_total = 0, ticks_min = 0xFFFFFFFFu, ticks_max = 0;
    tick_init();
#endif
    FILE *fin = fopen("tbn_inputs.bin", "rb");
    FILE *fout = fopen("tbn_outputs.bin", "wb");
    if (fin == NULL || fout == NULL) {
        printf("tbn: cannot open tbn_inputs.bin / tbn_outputs.bin\n");
        return 2;
    }
    if (fread(&count, sizeof count, 1, fin) != 1) {
        printf("tbn: tbn_inputs.bin has no count\n");
        return 3;
    }
    for (k = 0; k < count; ++k) {
        if (fread(in_buf, sizeof(float), TBN_HARNESS_IN, fin) != TBN_HARNESS_IN) {
            printf("tbn: tbn_inputs.bin is short at input %lu\n", (unsigned long)k);
            return 4;
        }
#if defined(__arm__)
        start = TBN_SYST_CVR;
#endif
        if (TBN_HARNESS_RUN(in_buf, out_buf) != 0) {
            printf("tbn: model failed on input %lu\n", (unsigned long)k);
            return 5;
        }
#if defined(__arm__)
        ticks = tick_since(start);
        ticks_total += ticks;
        ticks_min = ticks < ticks_min ? ticks : ticks_min;
        ticks_max = ticks > ticks_max ? ticks : ticks_max;
#endif
        if (fwrite(out_buf, sizeof(float), TBN_HARNESS_OUT, fout) != TBN_HARNESS_OUT) {
            printf("tbn: cannot write tbn_outputs.bin\n");
            return 6;
        }
    }
    fclose(fin);
    fclose(fout);
    printf("tbn: ran %lu inputs\n", (unsigned long)count);
#if defined(__arm__)
    printf("tbn: ticks_total=%lu ticks_min=%lu ticks_max=%lu calibration_ticks=%lu calibration_instructions=%lu\n",
           (unsigned long)ticks_total, (unsigned long)ticks_min, (unsigned long)ticks_max,
           (unsigned long)calibrate(), (unsigned long)(2u * TBN_CALIBRATION_LOOPS));
#endif
    return 0;
}
