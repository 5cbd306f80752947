/* Reset handler and vector table for the Cortex-M4 test board (qemu mps2-an386).
 *
 * Enables the FPU, copies .data from flash to RAM (as a board with real flash needs), then
 * enters newlib's semihosting C runtime (_start from rdimon-crt0: clears .bss, sets up
 * stdio over semihosting, calls main and exit).
 */
#include <stdint.h>

extern uint32_t __data_load__, __data_start__, __data_end__, __stack_top__;
extern void _start(void);

void Reset_Handler(void);
void Fault_Handler(void);

void Reset_Handler(void) {
    volatile uint32_t *cpacr = (volatile uint32_t *)0xE000ED88u;
    const uint32_t *src = &__data_load__;
    uint32_t *dst = &__data_start__;
    *cpacr |= 0xFu << 20; /* full access to CP10 and CP11 (the FPU) */
    __asm__ volatile("dsb\n\tisb");
    while (dst < &__data_end__) *dst++ = *src++;
    _start();
    for (;;) {
    }
}

/* Any fault ends the run with a non-zero status (semihosting SYS_EXIT, ADP_Stopped_RunTimeError). */
void Fault_Handler(void) {
    register uint32_t op __asm__("r0") = 0x18u;
    register uint32_t arg __asm__("r1") = 0x20023u;
    __asm__ volatile("bkpt 0xab" : : "r"(op), "r"(arg) : "memory");
    for (;;) {
    }
}

__attribute__((section(".isr_vector"), used)) static const uintptr_t vectors[16] = {
    (uintptr_t)&__stack_top__, (uintptr_t)Reset_Handler, (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler,
    (uintptr_t)Fault_Handler,  (uintptr_t)Fault_Handler, (uintptr_t)Fault_Handler,
};
